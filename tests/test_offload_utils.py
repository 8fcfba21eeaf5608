"""accelerate's offload-folder utilities and bigmodel's `StoreWeightsMap`.

Folders are written both by bigmodel and by accelerate and read back crosswise: the bytes on
disk and the index must be the same, so either library reads the other's folders.
"""

import json
import os
from pathlib import Path

import accelerate.utils as acc
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigmodel.empty import init_empty_weights
from bigmodel.offload import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    StoreWeightsMap,
    TensorSource,
    extract_submodules_state_dict,
    load_offloaded_weight,
    load_offloaded_weights,
    offload_state_dict,
    offload_weight,
    save_offload_index,
)


def _sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(4, 3, generator=generator)
    return {
        "fp32": floats,
        "fp16": floats.half(),
        "bf16": floats.bfloat16(),
        "fp8": floats.to(torch.float8_e4m3fn),
        "int64_transposed": torch.arange(12).reshape(3, 4).t(),
        "bool": floats > 0,
        "scalar": torch.tensor(3.5),
        "block.weight": floats[:2],
    }


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, to compare bit for bit (NaN-safe, dtype-agnostic)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_round_trip_is_bit_exact_and_identical_to_accelerate(tmp_path):
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours_index, theirs_index = {}, {}
    for name, tensor in _sample_tensors().items():
        assert offload_weight(tensor, name, ours_dir, index=ours_index) is ours_index
        acc.offload_weight(tensor, name, theirs_dir, index=theirs_index)
    assert ours_index == theirs_index
    assert ours_index["scalar"] == {"dtype": "float32", "shape": []}
    assert ours_index["bf16"]["dtype"] == "bfloat16"
    for name, tensor in _sample_tensors().items():
        file_name = f"{name}.dat"
        assert (ours_dir / file_name).read_bytes() == (theirs_dir / file_name).read_bytes()
        ours = load_offloaded_weight(ours_dir / file_name, ours_index[name])
        theirs = acc.load_offloaded_weight(str(ours_dir / file_name), ours_index[name])
        for loaded in (ours, theirs):
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert torch.equal(_bits(loaded), _bits(tensor))


def test_loaded_weight_is_a_private_copy(tmp_path):
    index = offload_weight(torch.ones(3), "w", tmp_path, index={})
    loaded = load_offloaded_weight(tmp_path / "w.dat", index["w"])
    loaded.add_(1)
    assert torch.equal(load_offloaded_weight(tmp_path / "w.dat", index["w"]), torch.ones(3))


def test_offload_weight_accepts_a_parameter_that_requires_grad(tmp_path):
    # accelerate raises here (numpy() of a tensor that requires grad).
    parameter = nn.Parameter(torch.arange(4.0))
    index = offload_weight(parameter, "p", tmp_path, index={})
    assert torch.equal(load_offloaded_weight(tmp_path / "p.dat", index["p"]), torch.arange(4.0))


def test_truncated_file_names_the_file_and_sizes(tmp_path):
    index = offload_weight(torch.ones(4, 4), "w", tmp_path, index={})
    Path(tmp_path / "w.dat").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"w\.dat holds 10 bytes .* needs 64"):
        load_offloaded_weight(tmp_path / "w.dat", index["w"])


def test_save_offload_index_merges_and_skips_empty(tmp_path):
    save_offload_index({}, tmp_path)
    save_offload_index(None, tmp_path)
    assert not (tmp_path / "index.json").exists()
    save_offload_index({"a": {"dtype": "float32", "shape": [1]}}, tmp_path)
    save_offload_index({"b": {"dtype": "int64", "shape": []}}, tmp_path)
    assert json.loads((tmp_path / "index.json").read_text()) == {
        "a": {"dtype": "float32", "shape": [1]},
        "b": {"dtype": "int64", "shape": []},
    }


def test_offload_state_dict_writes_a_folder_accelerate_reads(tmp_path):
    tensors = _sample_tensors()
    folder = tmp_path / "created"
    offload_state_dict(folder, tensors)
    loader = acc.OffloadedWeightsLoader(save_folder=str(folder))
    for name, tensor in tensors.items():
        assert torch.equal(_bits(loader[name]), _bits(tensor))
    offload_state_dict(tmp_path / "empty", {})
    assert os.listdir(tmp_path / "empty") == []


def test_prefixed_dataset_keeps_accelerate_quirks():
    data = {"a.x": 1, "a.y": 2, "b.x": 3}
    ours, theirs = PrefixedDataset(data, "a."), acc.PrefixedDataset(data, "a.")
    for view in (ours, theirs):
        assert view["x"] == 1
        assert list(view) == ["a.x", "a.y"]  # still-prefixed keys
        assert len(view) == 3  # the whole dataset
        assert "x" in view and "a.x" not in view
        assert view.get("z", "default") == "default"


def test_offloaded_weights_loader_reads_state_dict_dat_and_safetensors(tmp_path):
    offload_state_dict(tmp_path, {"on_disk": torch.arange(3.0), "shadowed": torch.zeros(1)})
    save_file({"stored_key": torch.arange(4.0)}, tmp_path / "model.safetensors")
    index = json.loads((tmp_path / "index.json").read_text())
    index["from_file"] = {
        "safetensors_file": str(tmp_path / "model.safetensors"),
        "weight_name": "stored_key",
        "dtype": "float16",
    }
    in_ram = {"shadowed": torch.ones(1)}
    loader = OffloadedWeightsLoader(state_dict=in_ram, save_folder=tmp_path, index=index)
    assert list(loader) == ["shadowed", "on_disk", "from_file"] and len(loader) == 3
    assert loader["shadowed"] is in_ram["shadowed"]
    assert torch.equal(loader["on_disk"], torch.arange(3.0))
    assert loader["from_file"].dtype == torch.float16
    assert torch.equal(loader["from_file"], torch.arange(4.0).half())
    with pytest.raises(KeyError):
        loader["absent"]
    assert list(OffloadedWeightsLoader(save_folder=tmp_path)) == ["on_disk", "shadowed"]
    with pytest.raises(ValueError, match="Need either a `state_dict`"):
        OffloadedWeightsLoader()


def test_extract_submodules_state_dict_matches_whole_names():
    state_dict = {"h.1.w": 1, "h.10.w": 2, "h.1": 3, "head.w": 4}
    assert extract_submodules_state_dict(state_dict, ["h.1"]) == {"h.1.w": 1, "h.1": 3}
    assert extract_submodules_state_dict(state_dict, ["h.1", "head"]) == {
        "h.1.w": 1,
        "h.1": 3,
        "head.w": 4,
    }
    assert extract_submodules_state_dict(state_dict, [""]) == {}  # as accelerate


def test_load_offloaded_weights_fills_an_empty_model(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    offload_state_dict(tmp_path, source.state_dict())
    with init_empty_weights():
        target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    index = json.loads((tmp_path / "index.json").read_text())
    load_offloaded_weights(target, index, tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    load_offloaded_weights(target, {}, tmp_path)  # nothing to do


# --------------------------------------------------------------------------------------
# StoreWeightsMap
# --------------------------------------------------------------------------------------


class RecordingStore(dict):
    """A mapping that records prefetch requests, like a TensorStore would serve them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.prefetched = []

    def prefetch(self, names):
        self.prefetched.append(list(names))


def test_store_weights_map_serves_ram_first_then_sources():
    store = RecordingStore({"a": torch.ones(2), "shared": torch.arange(2.0)})
    in_ram = {"a": torch.zeros(2)}
    weights = StoreWeightsMap(
        in_ram,
        {
            "a": TensorSource(store, "a"),
            "tied.first": TensorSource(store, "shared"),
            "tied.second": TensorSource(store, "shared"),
            "half": TensorSource(store, "shared", torch.float16),
        },
    )
    assert weights["a"] is in_ram["a"]
    assert weights["tied.first"] is weights["tied.second"]  # one stored tensor, two names
    assert weights["half"].dtype == torch.float16
    assert list(weights) == ["a", "tied.first", "tied.second", "half"] and len(weights) == 4
    assert "half" in weights and "absent" not in weights
    with pytest.raises(KeyError):
        weights["absent"]
    assert PrefixedDataset(weights, "tied.")["first"] is store["shared"]


def test_store_weights_map_prefetch_groups_keys_by_store():
    first, second = RecordingStore({"x": torch.ones(1)}), RecordingStore({"y": torch.ones(1)})
    no_prefetch = {"z": torch.ones(1)}
    weights = StoreWeightsMap(
        {"ram": torch.ones(1)},
        {
            "m.x": TensorSource(first, "x"),
            "m.y": TensorSource(second, "y"),
            "m.z": TensorSource(no_prefetch, "z"),
        },
    )
    weights.prefetch(["ram", "m.x", "m.y", "m.z", "unknown"])
    assert first.prefetched == [["x"]] and second.prefetched == [["y"]]
