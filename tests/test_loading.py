"""Checkpoint loading: discovery, load_state_dict, load_checkpoint_in_model, _and_dispatch.

Every loaded model is checked against the same network loaded in RAM by plain PyTorch
(bit-identical outputs), and where cheap against accelerate 1.15 on the same checkpoint.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from collections import Counter
from pathlib import Path

import accelerate
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigmodel import (
    dispatch,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
)
from bigmodel.loading import (
    CheckpointMismatchError,
    checkpoint_files,
    get_state_dict_from_offload,
    get_state_dict_offloaded_model,
    load_state_dict,
)
from bigmodel.loading import plan as loading_plan
from bigmodel.offload import stores
from bigmodel.planning.module_sizes import ModelScan
from bigmodel.store import TensorStore

INDEX_FILE = "bigmodel.index.json"


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class TinyNet(nn.Module):
    """Blocks, a BatchNorm (buffers that matter at eval) and a parameter on the root."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        hidden = self.embed(x)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.bn(hidden)) * self.scale


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.embed(ids))))


BLOCK_BYTES = (16 * 32 + 32 + 32 * 16 + 16 + 2 * 16) * 4  # fp32 parameters of one Block


def _trained_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights and non-trivial BatchNorm statistics, so every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[name] = torch.full_like(tensor, 7)
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return _trained_state(TinyNet())


@pytest.fixture(scope="module")
def reference(state) -> TinyNet:
    model = TinyNet()
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def safetensors_file(tmp_path, state) -> Path:
    path = tmp_path / "ckpt" / "model.safetensors"
    path.parent.mkdir()
    save_file(state, path, metadata={"format": "pt"})
    return path


def _empty_model() -> TinyNet:
    with init_empty_weights():
        model = TinyNet()
    return model.eval()


def _save_sharded(folder: Path, state: dict, groups: list[list[str]], suffix: str, bare=False):
    """Writes shards (named so that sorted order differs from the index order) and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for number, names in reversed(list(enumerate(groups))):
        shard = f"part-{number:02d}{suffix}"
        shard_state = {name: state[name] for name in names}
        if suffix == ".safetensors":
            save_file(shard_state, folder / shard, metadata={"format": "pt"})
        else:
            torch.save(shard_state, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = weight_map if bare else {"metadata": {}, "weight_map": weight_map}
    (folder / f"model{suffix}.index.json").write_text(json.dumps(index))
    return folder


def _groups(state: dict, count: int) -> list[list[str]]:
    names = list(state)
    return [names[i::count] for i in range(count)]


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


DISK_MIX = {
    "embed": "cpu",
    "blocks.0": "cpu",
    "blocks.1": "disk",
    "blocks.2": "cpu",
    "blocks.3": "disk",
    "bn": "disk",
    "head": "cpu",
    "scale": "cpu",
}


# ------------------------------------------------------------------ discovery


def test_checkpoint_files_single_file_and_folder_preferences(tmp_path, state, safetensors_file):
    assert checkpoint_files(safetensors_file) == [str(safetensors_file)]
    assert checkpoint_files(safetensors_file.parent) == [str(safetensors_file)]
    torch.save(state, safetensors_file.parent / "pytorch_model.bin")
    # pytorch_model.bin wins over model.safetensors, as in accelerate
    assert checkpoint_files(safetensors_file.parent) == [
        str(safetensors_file.parent / "pytorch_model.bin")
    ]


@pytest.mark.parametrize("bare", [False, True])
def test_checkpoint_files_sharded_index_gives_sorted_shards(tmp_path, state, bare):
    folder = _save_sharded(tmp_path / "s", state, _groups(state, 3), ".safetensors", bare=bare)
    expected = [str(folder / f"part-{n:02d}.safetensors") for n in range(3)]
    assert checkpoint_files(folder) == expected
    assert checkpoint_files(folder / "model.safetensors.index.json") == expected


def test_checkpoint_files_errors_match_accelerate_wording(tmp_path, state):
    with pytest.raises(ValueError, match="should be the path to a file containing a whole state"):
        checkpoint_files(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a folder containing a `.index.json` file"):
        checkpoint_files(tmp_path / "empty")
    two = _save_sharded(tmp_path / "two", state, _groups(state, 2), ".safetensors")
    (two / "other.index.json").write_text("{}")
    with pytest.raises(ValueError, match="containing more than one `.index.json` file"):
        checkpoint_files(two)
    # accelerate says the same
    for folder, wording in [(tmp_path / "empty", "is not a folder"), (two, "more than one")]:
        with pytest.raises(ValueError, match=wording):
            accelerate.load_checkpoint_in_model(TinyNet(), str(folder))


def test_index_naming_a_missing_shard_names_it(tmp_path, state):
    folder = _save_sharded(tmp_path / "s", state, _groups(state, 2), ".safetensors")
    (folder / "part-01.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="part-01.safetensors"):
        checkpoint_files(folder)


# ------------------------------------------------------------------ load_state_dict


def test_load_state_dict_safetensors_and_bin(tmp_path, state, safetensors_file):
    loaded = load_state_dict(safetensors_file)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    torch.save(state, tmp_path / "weights.pt")
    loaded_bin = load_state_dict(tmp_path / "weights.pt")
    assert all(torch.equal(loaded_bin[name], state[name]) for name in state)
    mixed = load_state_dict(safetensors_file, {"embed": "cpu", "blocks": "disk", "": "cpu"})
    assert all(torch.equal(mixed[name], state[name]) for name in state)
    assert {t.device.type for t in mixed.values()} == {"cpu"}


def test_load_state_dict_refuses_non_pytorch_safetensors(tmp_path, state, caplog):
    save_file(state, tmp_path / "tf.safetensors", metadata={"format": "tf"})
    with pytest.raises(ValueError, match="saved with tf, we need a the pt format"):
        load_state_dict(tmp_path / "tf.safetensors")
    save_file(state, tmp_path / "odd.safetensors", metadata={"format": "onnx"})
    with pytest.raises(OSError, match="does not contain the valid metadata"):
        load_state_dict(tmp_path / "odd.safetensors")
    save_file(state, tmp_path / "bare.safetensors")
    with caplog.at_level(logging.WARNING, logger="bigmodel.loading"):
        loaded = load_state_dict(tmp_path / "bare.safetensors")
    assert "does not contain metadata" in caplog.text
    assert torch.equal(loaded["head.weight"], state["head.weight"])


# ------------------------------------------------------------------ load_checkpoint_in_model


def _assert_state_equal(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def _legacy_pickle(path: Path, state: dict) -> Path:
    """A file from torch's pre-zip format, which cannot be memory-mapped."""
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def _bin_folder(tmp_path: Path, state: dict) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


LAYOUTS = {
    "file": lambda tmp_path, state, single: single,
    "folder-bin": lambda tmp_path, state, single: _bin_folder(tmp_path, state),
    "legacy-pickle": lambda tmp_path, state, single: _legacy_pickle(tmp_path / "w.pt", state),
    "sharded-st": lambda tmp_path, state, single: _save_sharded(
        tmp_path / "s", state, _groups(state, 3), ".safetensors"
    ),
    "sharded-bin": lambda tmp_path, state, single: _save_sharded(
        tmp_path / "b", state, _groups(state, 2), ".bin"
    ),
    "bare-index": lambda tmp_path, state, single: (
        _save_sharded(tmp_path / "r", state, _groups(state, 2), ".safetensors", bare=True)
        / "model.safetensors.index.json"
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_into_empty_model_from_every_layout(tmp_path, state, safetensors_file, layout):
    checkpoint = LAYOUTS[layout](tmp_path, state, safetensors_file)
    model = _empty_model()
    load_checkpoint_in_model(model, checkpoint)
    _assert_state_equal(model, state)
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


def test_loaded_cpu_tensors_outlive_the_checkpoint_mapping(state, safetensors_file):
    model = _empty_model()
    load_checkpoint_in_model(model, safetensors_file)
    gc.collect()
    _assert_state_equal(model, state)
    # writing to a loaded weight must not reach the checkpoint file (copy-on-write or a copy)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(load_state_dict(safetensors_file)["head.weight"], state["head.weight"])
    assert torch.equal(model.head.weight, state["head.weight"] + 1.0)


def _mapped_from(path: Path, tensor: torch.Tensor) -> bool:
    """True when the tensor's bytes lie in a memory mapping of ``path`` (Linux)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= tensor.data_ptr() < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc")
def test_cpu_weights_are_zero_copy_views_unless_cast(safetensors_file):
    model = _empty_model()
    load_checkpoint_in_model(model, safetensors_file)
    assert _mapped_from(safetensors_file, model.blocks[3].fc1.weight)
    cast = _empty_model()
    load_checkpoint_in_model(cast, safetensors_file, dtype=torch.float16)
    assert not _mapped_from(safetensors_file, cast.blocks[3].fc1.weight)


def test_real_model_keeps_its_parameter_objects(state, safetensors_file):
    model = TinyNet()
    weight = model.head.weight
    load_checkpoint_in_model(model, safetensors_file)
    assert model.head.weight is weight
    _assert_state_equal(model, state)


@pytest.mark.parametrize("device_map", [None, {"": "cpu"}])
def test_dtype_is_honoured_with_and_without_device_map(state, safetensors_file, device_map):
    model = _empty_model()
    load_checkpoint_in_model(model, safetensors_file, device_map=device_map, dtype="torch.float16")
    assert model.head.weight.dtype == torch.float16
    assert torch.equal(model.head.weight, state["head.weight"].half())
    assert model.bn.num_batches_tracked.dtype == torch.int64  # integers are never cast


def test_keep_in_fp32_modules_matches_whole_components_for_bf16(state, safetensors_file):
    model = _empty_model()
    load_checkpoint_in_model(
        model,
        safetensors_file,
        device_map={"": "cpu"},
        dtype=torch.bfloat16,
        keep_in_fp32_modules=["fc2", "head"],
    )
    assert model.blocks[2].fc2.weight.dtype == torch.float32
    assert torch.equal(model.blocks[2].fc2.weight, state["blocks.2.fc2.weight"])
    assert model.head.bias.dtype == torch.float32
    assert model.blocks[2].fc1.weight.dtype == torch.bfloat16


def test_cpu_map_loads_the_same_values_as_accelerate(tmp_path, state, safetensors_file):
    device_map = {"embed": "cpu", "blocks": "cpu", "bn": "cpu", "head": "cpu", "scale": "cpu"}
    ours = _empty_model()
    load_checkpoint_in_model(ours, safetensors_file, device_map=device_map, dtype=torch.float16)
    with accelerate.init_empty_weights():
        theirs = TinyNet()
    accelerate.load_checkpoint_in_model(
        theirs, str(safetensors_file), device_map=device_map, dtype=torch.float16
    )
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == theirs_state[name].dtype, name
        assert torch.equal(tensor, theirs_state[name]), name


# ------------------------------------------------------------------ errors


def test_missing_keys_on_meta_raise_even_when_not_strict(tmp_path, state):
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    save_file(partial, tmp_path / "partial.safetensors", metadata={"format": "pt"})
    for strict in (False, True):
        model = _empty_model()
        with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.fc1\.weight") as error:
            load_checkpoint_in_model(model, tmp_path / "partial.safetensors", strict=strict)
        assert isinstance(error.value, ValueError) and isinstance(error.value, RuntimeError)
        assert model.head.weight.device.type == "meta"  # nothing was loaded


def test_missing_keys_of_a_real_model_warn_unless_strict(tmp_path, state, caplog):
    partial = {k: v for k, v in state.items() if k != "head.bias"}
    save_file(partial, tmp_path / "partial.safetensors", metadata={"format": "pt"})
    model = TinyNet()
    kept = model.head.bias.detach().clone()
    with caplog.at_level(logging.WARNING, logger="bigmodel.loading"):
        load_checkpoint_in_model(model, tmp_path / "partial.safetensors", device_map={"": "cpu"})
    assert "head.bias" in caplog.text
    assert torch.equal(model.head.bias, kept)
    with pytest.raises(
        CheckpointMismatchError, match=r"missing from the checkpoint: \['head.bias'"
    ):
        load_checkpoint_in_model(TinyNet(), tmp_path / "partial.safetensors", strict=True)


def test_unexpected_keys_warn_or_raise_with_strict(tmp_path, state, caplog):
    save_file({**state, "extra.weight": torch.ones(2)}, tmp_path / "x.safetensors")
    model = _empty_model()
    with caplog.at_level(logging.WARNING, logger="bigmodel.loading"):
        load_checkpoint_in_model(model, tmp_path / "x.safetensors", device_map={"": "cpu"})
    assert "were not used when" in caplog.text and "extra.weight" in caplog.text
    _assert_state_equal(model, state)
    with pytest.raises(CheckpointMismatchError, match="extra.weight"):
        load_checkpoint_in_model(_empty_model(), tmp_path / "x.safetensors", strict=True)


def test_shape_mismatch_names_tensor_and_file(tmp_path, state):
    save_file({**state, "head.bias": torch.ones(5)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"head\.bias: \[5\] in .*bad\.safetensors"):
        load_checkpoint_in_model(_empty_model(), tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "is not a device"),
        (-1, "is not a device"),
        (True, "is not a device"),
        ("meta", "cannot be loaded to"),
        (f"cuda:{torch.cuda.device_count()}", "this machine has"),
    ],
)
def test_bad_device_names_are_refused_before_loading(safetensors_file, device, message):
    model = _empty_model()
    with pytest.raises(ValueError, match=message):
        load_checkpoint_in_model(model, safetensors_file, device_map={"": "cpu", "head": device})
    assert model.embed.weight.device.type == "meta"


def test_unknown_and_uncovering_device_map_keys(safetensors_file):
    with pytest.raises(ValueError, match=r"\['blocks\.7'\] name no module"):
        load_checkpoint_in_model(
            _empty_model(), safetensors_file, device_map={"": "cpu", "blocks.7": "disk"}
        )
    with pytest.raises(ValueError, match="head"):
        load_checkpoint_in_model(_empty_model(), safetensors_file, device_map={"embed": "cpu"})


def test_disk_without_offload_folder_says_what_goes_where(safetensors_file):
    with pytest.raises(ValueError) as error:
        load_checkpoint_in_model(_empty_model(), safetensors_file, device_map=DISK_MIX)
    message = str(error.value)
    assert "please pass along an `offload_folder`" in message
    assert f"blocks.1: {BLOCK_BYTES / 1000:.2f} KB" in message
    assert "'cpu':" in message and "placed" in message


def test_too_small_budget_without_offload_folder_reports_budget(safetensors_file):
    with pytest.raises(ValueError) as error:
        load_checkpoint_and_dispatch(
            _empty_model(), safetensors_file, device_map="sequential", max_memory={"cpu": 10_000}
        )
    message = str(error.value)
    assert "budget" in message and "10.00 KB budget" in message
    assert "blocks." in message


def test_invalid_string_device_map(safetensors_file):
    with pytest.raises(ValueError, match="please choose 'auto', 'balanced'"):
        load_checkpoint_and_dispatch(_empty_model(), safetensors_file, device_map="everywhere")


# ------------------------------------------------------------------ dispatch


def _dispatch(checkpoint, offload_folder, **kwargs) -> TinyNet:
    return load_checkpoint_and_dispatch(
        _empty_model(), checkpoint, offload_folder=offload_folder, **kwargs
    )


def test_cpu_disk_mix_equals_in_ram_and_writes_no_tensor_bytes(
    tmp_path, safetensors_file, reference, inputs
):
    model = _dispatch(safetensors_file, tmp_path / "offload", device_map=DISK_MIX)
    assert model.blocks[1].fc1.weight.device.type == "meta"
    assert torch.equal(model(inputs), reference(inputs))
    assert model.hf_device_map == DISK_MIX
    assert list(_folder_bytes(tmp_path / "offload")) == [INDEX_FILE]
    with TensorStore.open(tmp_path / "offload") as store:
        assert {f["path"] for f in store.files()} == {str(safetensors_file)}
        assert all(f["mounted"] for f in store.files())


def test_disk_buffers_get_checkpoint_values(tmp_path, safetensors_file, reference, state):
    # accelerate leaves a disk module's buffers at their constructor values (quirk 4)
    model = _dispatch(safetensors_file, tmp_path / "o", device_map=DISK_MIX)
    assert torch.equal(model.bn.running_mean, state["bn.running_mean"])
    buffered = _dispatch(
        safetensors_file, tmp_path / "o2", device_map=DISK_MIX, offload_buffers=True
    )
    assert buffered.bn.running_mean.device.type == "meta"
    inputs = torch.randn(3, 8)
    assert torch.equal(buffered(inputs), reference(inputs))


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_string_maps_equal_in_ram_and_plan_like_accelerate(
    tmp_path, safetensors_file, reference, inputs, strategy
):
    budget = {"cpu": 2 * BLOCK_BYTES + 1000}
    model = _dispatch(
        safetensors_file,
        tmp_path / "o",
        device_map=strategy,
        max_memory=dict(budget),
        no_split_module_classes=["Block"],
    )
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(model(inputs), reference(inputs))
    with accelerate.init_empty_weights():
        theirs = TinyNet().eval()
    theirs = accelerate.load_checkpoint_and_dispatch(
        theirs,
        str(safetensors_file),
        device_map=strategy,
        max_memory=dict(budget),
        no_split_module_classes=["Block"],
        offload_folder=str(tmp_path / "theirs"),
    )
    assert model.hf_device_map == theirs.hf_device_map


def test_accelerate_agrees_except_for_disk_buffers(tmp_path, safetensors_file, reference, inputs):
    """Same map in accelerate: same outputs once its disk-module buffers are offloaded too;
    with offload_buffers=False it leaves them at their constructor values (quirk 4)."""
    ours = _dispatch(safetensors_file, tmp_path / "ours", device_map=DISK_MIX)
    theirs = {}
    for offload_buffers in (False, True):
        with accelerate.init_empty_weights():
            model = TinyNet().eval()
        theirs[offload_buffers] = accelerate.load_checkpoint_and_dispatch(
            model,
            str(safetensors_file),
            device_map=DISK_MIX,
            offload_folder=str(tmp_path / f"theirs{offload_buffers}"),
            offload_buffers=offload_buffers,
        )
    assert torch.equal(ours(inputs), theirs[True](inputs))
    assert torch.equal(theirs[False].bn.running_mean, torch.zeros(16))
    assert not torch.equal(theirs[False](inputs), reference(inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerator_cpu_disk_mix_equals_in_ram(tmp_path, safetensors_file, reference, inputs):
    device_map = {**DISK_MIX, "embed": 0, "head": 0, "scale": 0}
    model = _dispatch(safetensors_file, tmp_path / "o", device_map=device_map)
    assert model.embed.weight.device == torch.device("cuda", 0)
    assert model.blocks[0].fc1.weight.device.type == "meta"  # "cpu" is offload with a GPU
    expected = copy.deepcopy(reference).to(0)(inputs.to(0)).cpu()
    assert torch.equal(model(inputs), expected)


def test_sharded_bin_checkpoint_writes_only_disk_tensors(tmp_path, state, reference, inputs):
    folder = _save_sharded(tmp_path / "b", state, _groups(state, 3), ".bin")
    model = _dispatch(folder, tmp_path / "o", device_map=DISK_MIX)
    assert torch.equal(model(inputs), reference(inputs))
    with TensorStore.open(tmp_path / "o") as store:
        on_disk = {n for n in state if n.startswith(("blocks.1.", "blocks.3.", "bn."))}
        assert set(store) == on_disk - {n for n in on_disk if "running" in n or "num_b" in n}


def test_disk_tensor_missing_from_checkpoint_keeps_the_model_value(tmp_path, state, inputs):
    """A real model's own value is written next to the mounted checkpoint."""
    partial = {k: v for k, v in state.items() if k != "blocks.1.fc1.bias"}
    save_file(partial, tmp_path / "partial.safetensors", metadata={"format": "pt"})
    model = TinyNet().eval()
    expected = TinyNet().eval()
    expected.load_state_dict({**state, "blocks.1.fc1.bias": model.blocks[1].fc1.bias.detach()})
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "partial.safetensors", device_map=DISK_MIX, offload_folder=tmp_path / "o"
    )
    assert torch.equal(model(inputs), expected(inputs))
    with TensorStore.open(tmp_path / "o") as store:
        assert {f["mounted"] for f in store.files()} == {True}
        assert store.info("blocks.1.fc1.bias")["file"] != str(tmp_path / "partial.safetensors")


def test_dtype_with_disk_offload_equals_in_ram_cast(tmp_path, safetensors_file, reference, inputs):
    model = _dispatch(safetensors_file, tmp_path / "o", device_map=DISK_MIX, dtype="float16")
    assert model.blocks[1].fc1.weight.dtype == torch.float16  # the placeholder computes in fp16
    half = TinyNet().eval()
    half.load_state_dict(reference.state_dict())
    half = half.half()
    assert torch.equal(model(inputs.half()), half(inputs.half()))


def test_offload_state_dict_gives_the_same_model(tmp_path, safetensors_file, reference, inputs):
    model = _dispatch(
        safetensors_file, tmp_path / "o", device_map=DISK_MIX, offload_state_dict=True
    )
    assert torch.equal(model(inputs), reference(inputs))


@pytest.mark.parametrize(
    "device_map",
    [
        {"embed": "disk", "mid": "cpu", "out": "disk"},
        {"embed": "cpu", "mid": "cpu", "out": "disk"},
        {"embed": "disk", "mid": "cpu", "out": "cpu"},
    ],
)
def test_tied_weight_saved_once_serves_both_names(tmp_path, device_map):
    source = TiedNet()
    state = {k: v for k, v in source.state_dict().items() if k != "out.weight"}
    save_file(state, tmp_path / "tied.safetensors", metadata={"format": "pt"})
    with init_empty_weights():
        model = TiedNet()
    model.out.weight = model.embed.weight  # empty init unties (as in accelerate): tie_weights()
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "tied.safetensors", device_map=device_map, offload_folder=tmp_path / "o"
    )
    ids = torch.tensor([[1, 2, 3, 9]])
    assert torch.equal(model(ids), source(ids))
    assert list(_folder_bytes(tmp_path / "o")) == [INDEX_FILE]  # no copy of the tied weight


def test_state_dict_of_an_offloaded_model_includes_root_tensors(tmp_path, safetensors_file, state):
    model = _dispatch(safetensors_file, tmp_path / "o", device_map=DISK_MIX)
    collected = get_state_dict_offloaded_model(model)
    assert list(collected) == list(state)
    assert all(torch.equal(collected[name], state[name]) for name in state)
    partial = {"blocks.1.fc1.weight": "", "blocks.1.fc1.bias": ""}
    filled = get_state_dict_from_offload(model.blocks[1].fc1, "blocks.1.fc1.weight", partial)
    assert torch.equal(filled["blocks.1.fc1.weight"], state["blocks.1.fc1.weight"])
    assert model.blocks[1].fc1.weight.device.type == "meta"  # offloaded again afterwards


def test_dispatch_none_returns_loaded_model_without_hooks(safetensors_file, reference, inputs):
    model = load_checkpoint_and_dispatch(_empty_model(), safetensors_file)
    assert not hasattr(model, "hf_device_map")
    assert torch.equal(model(inputs), reference(inputs))


def test_auto_dispatch_walks_the_model_once_and_checks_once(
    tmp_path, safetensors_file, reference, inputs, monkeypatch
):
    """One plan: the budgets, the map and the ties come from one walk of the model; the map
    is checked once; the store loading committed is not checked again by the dispatch."""
    calls = Counter()

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    scan_init = ModelScan.__init__
    monkeypatch.setattr(ModelScan, "__init__", counted("walks", scan_init))
    for module in (loading_plan, dispatch):
        check = counted("map checks", module.check_device_map)
        monkeypatch.setattr(module, "check_device_map", check)
    monkeypatch.setattr(stores, "check_sources", counted("store checks", stores.check_sources))
    model = _dispatch(
        safetensors_file, tmp_path / "offload", device_map="auto", max_memory={"cpu": 5000}
    )
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(model(inputs), reference(inputs))
    assert calls == {"walks": 1, "map checks": 1}


def test_offload_folder_is_created_and_reused(tmp_path, safetensors_file, reference, inputs):
    folder = tmp_path / "nested" / "offload"
    for _ in range(2):
        model = _dispatch(safetensors_file, folder, device_map=DISK_MIX)
        assert torch.equal(model(inputs), reference(inputs))
    assert os.listdir(folder) == [INDEX_FILE]
