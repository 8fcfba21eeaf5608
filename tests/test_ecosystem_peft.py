"""peft on bigmodel: ``PeftModel.from_pretrained`` on a base model dispatched with layers on
disk (through `bigmodel.patch_accelerate`), compared with the adapted model in RAM and with
accelerate; LoRA layers added after dispatch fail with a clear error instead of computing
with placeholder memory."""

from __future__ import annotations

import copy

import pytest
import torch
from _ecosystem import (  # noqa: F401
    ENGINES,
    LLAMA_DISK_MAP,
    engine,
    logits,
    offline,
    on_both,
    quiet,
    tiny_llama,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import bigmodel
from bigmodel.utils import compute_module_sizes

LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
DISK_LAYER = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base model folder, adapter folder, logits of the adapted model in RAM)."""
    root = tmp_path_factory.mktemp("peft")
    base_folder = root / "models--tiny--llama"  # a hub-cache-like name, as peft expects
    tiny_llama().save_pretrained(base_folder)
    torch.manual_seed(1)  # random LoRA weights (init_lora_weights=False): not a no-op
    adapted = get_peft_model(tiny_llama(), LORA)
    adapted.save_pretrained(root / "adapter")
    return base_folder, root / "adapter", logits(adapted)


def _dispatched_base(folder, offload_folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map=LLAMA_DISK_MAP, offload_folder=offload_folder
    )


def test_peft_model_from_pretrained_on_a_dispatched_base(saved, tmp_path, monkeypatch):
    base_folder, adapter_folder, expected = saved
    # peft writes the base checkpoint again, with the adapter, under a path relative to the
    # working directory
    monkeypatch.chdir(tmp_path)
    budget = {"cpu": compute_module_sizes(tiny_llama())[""] // 2}

    def adapted_logits(engine_name: str) -> torch.Tensor:
        offload_folder = tmp_path / engine_name
        base = _dispatched_base(base_folder, offload_folder)
        model = PeftModel.from_pretrained(
            base, adapter_folder, max_memory=dict(budget), offload_folder=offload_folder
        )
        assert "disk" in model.hf_device_map.values()
        return logits(model)

    results = on_both(adapted_logits)
    assert torch.equal(results["bigmodel"], expected)
    assert torch.equal(results["bigmodel"], results["accelerate"])


def test_offload_weights_map_gives_peft_accelerates_offload_index(saved, tmp_path):
    base_folder, _, _ = saved
    indexes = {}
    for name in ENGINES:
        with engine(name):
            model = _dispatched_base(base_folder, tmp_path / name)
        # what peft reads to rebuild the offload index of a dispatched model
        dataset = model.get_submodule(DISK_LAYER)._hf_hook.weights_map.dataset
        indexes[name] = {key: dataset.index[key] for key in (f"{DISK_LAYER}.weight",)}
    assert indexes["bigmodel"] == indexes["accelerate"]
    entry = indexes["bigmodel"][f"{DISK_LAYER}.weight"]
    assert entry["safetensors_file"] == str(base_folder / "model.safetensors")


def test_lora_added_after_dispatch_fails_naming_the_module(saved, tmp_path):
    base_folder, adapter_folder, _ = saved
    with bigmodel.patch_accelerate():
        model = get_peft_model(_dispatched_base(base_folder, tmp_path / "a"), LORA)
        with pytest.raises(RuntimeError, match=f"offloaded module '{DISK_LAYER}'.*before dispatch"):
            logits(model)
        base = _dispatched_base(base_folder, tmp_path / "b")
        base.load_adapter(adapter_folder)  # transformers' way in: the same injection
        with pytest.raises(RuntimeError, match="lora_A.default.weight, lora_B.default.weight"):
            logits(base)


def test_lora_added_before_dispatch_is_served_from_disk(saved, tmp_path):
    base_folder, adapter_folder, expected = saved
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder
    )
    bigmodel.disk_offload(model, tmp_path / "offload")
    lora = model.get_submodule(f"base_model.model.{DISK_LAYER}.lora_A.default")
    assert lora.weight.device.type == "meta"  # served by its offload hook
    assert torch.equal(logits(model), expected)


class _AddsAProjection(torch.nn.Module):
    """A layer wrapped after dispatch, with a weight of its own that holds values."""

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.extra = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.extra(x)


def test_a_layer_wrapped_after_dispatch_whose_weights_hold_values_runs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    reference = copy.deepcopy(model)
    bigmodel.disk_offload(model, tmp_path / "offload")
    model[0] = _AddsAProjection(model[0])
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = reference[2](reference[1](reference[0](x) + model[0].extra(x)))
        assert torch.equal(model(x), expected)
