"""The disk store's RAM budget reaches the store on every path (see `bigmodel.budget`)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigmodel import (
    disk_offload,
    dispatch_model,
    infer_auto_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from bigmodel.budget import available_memory, bytes_kept_in_ram
from bigmodel.prefetch import offload_stores

WIDTH = 64
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4


class Stack(nn.Module):
    def __init__(self, depth: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = Stack().eval()
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), path)
    return reference, path


def _meta_model() -> Stack:
    with init_empty_weights():
        return Stack().eval()


def _store_budget(model: nn.Module) -> int:
    (store,) = offload_stores(model)
    return store.stats()["budget"]


def test_a_map_planned_with_a_cpu_budget_keeps_it_when_loaded_in_two_steps(checkpoint, tmp_path):
    reference, path = checkpoint
    model = _meta_model()
    cpu_budget = 4 * LAYER_BYTES
    device_map = infer_auto_device_map(model, max_memory={"cpu": cpu_budget})
    assert "disk" in device_map.values()
    model = load_checkpoint_and_dispatch(
        model, path, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert _store_budget(model) == cpu_budget - bytes_kept_in_ram(model, device_map)
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_dispatch_model_keeps_the_planned_budget(checkpoint, tmp_path):
    reference, _ = checkpoint
    model = Stack().eval()
    model.load_state_dict(reference.state_dict())
    cpu_budget = 3 * LAYER_BYTES
    device_map = infer_auto_device_map(model, max_memory={"cpu": cpu_budget})
    dispatch_model(model, device_map, offload_dir=tmp_path / "offload")
    assert _store_budget(model) == cpu_budget - bytes_kept_in_ram(model, device_map)


def test_a_cpu_budget_given_with_a_dict_map_reaches_the_store(checkpoint, tmp_path):
    _, path = checkpoint
    model = _meta_model()
    device_map = {"layers.0": "cpu", "layers.1": "cpu"} | {
        f"layers.{n}": "disk" for n in range(2, 8)
    }
    model = load_checkpoint_and_dispatch(
        model,
        path,
        device_map=device_map,
        max_memory={"cpu": 5 * LAYER_BYTES},
        offload_folder=tmp_path / "offload",
    )
    assert _store_budget(model) == 3 * LAYER_BYTES


def test_max_resident_wins_over_every_other_source(checkpoint, tmp_path):
    _, path = checkpoint
    model = _meta_model()
    device_map = infer_auto_device_map(model, max_memory={"cpu": 4 * LAYER_BYTES})
    model = load_checkpoint_and_dispatch(
        model,
        path,
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        max_resident=LAYER_BYTES,
    )
    assert _store_budget(model) == LAYER_BYTES


def test_without_any_budget_the_store_takes_half_the_available_memory(checkpoint, tmp_path, caplog):
    reference, _ = checkpoint
    model = Stack().eval()
    model.load_state_dict(reference.state_dict())
    with caplog.at_level(logging.INFO, logger="bigmodel.budget"):
        disk_offload(model, tmp_path / "offload", execution_device="cpu")
    budget = _store_budget(model)
    assert 0 < budget <= available_memory()
    assert "half the memory available on this machine" in caplog.text


def test_stores_mounted_from_an_offload_index_share_the_budget(checkpoint, tmp_path):
    reference, path = checkpoint
    model = _meta_model()
    device_map = {"layers.0": "cpu"} | {f"layers.{n}": "disk" for n in range(1, 8)}
    model.layers[0].to_empty(device="cpu").load_state_dict(reference.layers[0].state_dict())
    offload_index = {
        name: {"safetensors_file": str(path), "weight_name": name, "dtype": "float32"}
        for name in reference.state_dict()
        if not name.startswith("layers.0.")
    }
    dispatch_model(model, device_map, offload_index=offload_index, max_resident=2 * LAYER_BYTES)
    assert _store_budget(model) == 2 * LAYER_BYTES
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
