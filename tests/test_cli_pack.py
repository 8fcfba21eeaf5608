"""`bigmodel pack`: the sources it reads, the ones it refuses, its destination rules, its
summary, Ctrl-C, and the store it writes loading with `load_checkpoint_and_dispatch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import safetensors.torch
import torch
from _cli import assert_clean_failure, cli_command, cli_env, run_cli
from torch import nn

from bigmodel import _core, init_empty_weights, load_checkpoint_and_dispatch
from bigmodel.cli import main
from bigmodel.store import TensorStore, write_store

TENSORS = {
    "embed.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8),
    "layers.0.weight": torch.ones(4, 4, dtype=torch.float16),
    "layers.1.weight": torch.zeros(4, 4, dtype=torch.float16),
}


def _pack(capsys, *argv) -> tuple[int, str, str]:
    code = main(["pack", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_holds(store_path, expected: dict[str, torch.Tensor]) -> None:
    with TensorStore.open(store_path) as store:
        assert sorted(store) == sorted(expected)
        for name, tensor in expected.items():
            assert store[name].dtype == tensor.dtype
            assert torch.equal(store[name], tensor), name


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def test_pack_a_safetensors_file(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    code, _, _ = _pack(capsys, source, tmp_path / "packed", "--codec", "zstd")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)
    with TensorStore.open(tmp_path / "packed") as store:
        assert {store.info(k)["codec"] for k in store} == {"zstd"}


def test_pack_a_bin_checkpoint(tmp_path, capsys):
    source = tmp_path / "pytorch_model.bin"
    torch.save(TENSORS, source)
    code, _, _ = _pack(capsys, source, tmp_path / "packed")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_a_legacy_torch_save_file(tmp_path, capsys):
    source = tmp_path / "old.pt"
    torch.save(TENSORS, source, _use_new_zipfile_serialization=False)
    code, _, _ = _pack(capsys, source, tmp_path / "packed")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_takes_the_state_dict_of_a_training_checkpoint_and_says_so(tmp_path, capsys):
    source = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": TENSORS, "epoch": 3, "lr": 0.1}, source)
    code, out, _ = _pack(capsys, source, tmp_path / "packed")
    assert code == 0
    assert f"{source}: took the state dict under the key 'state_dict'" in out
    assert "'epoch'" in out
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_skips_non_tensor_entries_beside_tensors_and_says_so(tmp_path, capsys):
    source = tmp_path / "weights.bin"
    torch.save({**TENSORS, "step": 12}, source)
    code, out, _ = _pack(capsys, source, tmp_path / "packed")
    assert code == 0
    assert "skipped 1 entries that are not tensors: 'step'" in out
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_a_sharded_safetensors_folder(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    safetensors.torch.save_file({"embed.weight": TENSORS["embed.weight"]}, folder / "a.safetensors")
    rest = {k: v for k, v in TENSORS.items() if k != "embed.weight"}
    safetensors.torch.save_file(rest, folder / "b.safetensors")
    weight_map = {"embed.weight": "a.safetensors", **{k: "b.safetensors" for k in rest}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, _ = _pack(capsys, folder, tmp_path / "packed")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_an_accelerate_offload_folder(tmp_path, capsys):
    from accelerate.utils import offload_state_dict

    offload_state_dict(tmp_path / "offload", TENSORS)
    code, _, _ = _pack(capsys, tmp_path / "offload", tmp_path / "packed")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_ends_with_a_summary(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"zeros": torch.zeros(10_000)}, source)
    code, out, _ = _pack(capsys, source, tmp_path / "packed", "--codec", "zstd")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"packed {source} into {tmp_path / 'packed'}"
    assert "tensors:      1 in 1 file(s)" in lines
    bytes_line = next(line for line in lines if line.startswith("bytes:"))
    assert "40.00 KB raw" in bytes_line and "compression ratio" in bytes_line
    stored = next(f for f in (tmp_path / "packed").iterdir() if f.name != _core.INDEX_FILE)
    ratio = 40_000 / stored.stat().st_size
    assert f"compression ratio {ratio:.2f}" in bytes_line
    assert any(line.startswith("time:") and " s (" in line for line in lines)


# --------------------------------------------------------------------------------------
# Refusals: one line naming the file, exit 2, nothing written
# --------------------------------------------------------------------------------------


def _refused(tmp_path, source, *expected) -> None:
    result = run_cli("pack", source, tmp_path / "packed")
    assert_clean_failure(result, 2, source, *expected)
    assert not (tmp_path / "packed").exists()


def test_pack_refuses_a_pickled_module(tmp_path):
    source = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), source)
    _refused(tmp_path, source, "torch.nn.modules.linear.Linear", "state_dict()")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pack_refuses_a_truncated_bin(tmp_path, legacy):
    source = tmp_path / "pytorch_model.bin"
    torch.save(TENSORS, source, _use_new_zipfile_serialization=not legacy)
    os.truncate(source, source.stat().st_size // 2)
    _refused(tmp_path, source, "truncated or damaged")


def test_pack_refuses_a_file_without_a_state_dict(tmp_path):
    source = tmp_path / "list.pt"
    torch.save([torch.ones(2)], source)
    _refused(tmp_path, source, "holds a list, not a state dict")


def test_pack_refuses_two_unnamed_state_dicts(tmp_path):
    source = tmp_path / "two.pt"
    torch.save({"generator": TENSORS, "discriminator": TENSORS}, source)
    _refused(tmp_path, source, "'generator', 'discriminator'")


def test_pack_onto_a_store_refuses_without_force(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    write_store(tmp_path / "packed", {"old": torch.ones(3)})
    result = run_cli("pack", source, tmp_path / "packed")
    assert_clean_failure(result, 2, tmp_path / "packed", "--force")
    _assert_holds(tmp_path / "packed", {"old": torch.ones(3)})
    code, _, _ = _pack(capsys, source, tmp_path / "packed", "--force")
    assert code == 0
    _assert_holds(tmp_path / "packed", TENSORS)


def test_pack_into_a_non_empty_folder_refuses_without_force(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "notes.txt").write_text("mine")
    result = run_cli("pack", source, tmp_path / "dest")
    assert_clean_failure(result, 2, tmp_path / "dest", "not empty", "--force")
    assert os.listdir(tmp_path / "dest") == ["notes.txt"]
    code, _, _ = _pack(capsys, source, tmp_path / "dest", "--force")
    assert code == 0
    _assert_holds(tmp_path / "dest", TENSORS)
    assert (tmp_path / "dest" / "notes.txt").read_text() == "mine"


def test_pack_into_an_empty_folder_needs_no_force(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    (tmp_path / "dest").mkdir()
    code, _, _ = _pack(capsys, source, tmp_path / "dest")
    assert code == 0
    _assert_holds(tmp_path / "dest", TENSORS)


def test_ctrl_c_stops_pack_with_nothing_left(tmp_path):
    # 20,000 tensors: seconds of writing, so the interrupt lands in the middle of it.
    source = tmp_path / "many.safetensors"
    many = {f"layers.{i}.weight": torch.full((1024,), float(i)) for i in range(20_000)}
    safetensors.torch.save_file(many, source)
    dest = tmp_path / "packed"
    process = subprocess.Popen(
        cli_command("pack", source, dest, "--codec", "zstd"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    deadline = time.monotonic() + 120
    while not dest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer has started once the destination exists
    assert process.poll() is None, "pack ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGINT
    assert stderr.strip() == "bigmodel: interrupted"
    assert not dest.exists()


# --------------------------------------------------------------------------------------
# A packed store is a checkpoint
# --------------------------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_packed_store_loads_with_load_checkpoint_and_dispatch(tmp_path, capsys, codec):
    torch.manual_seed(0)
    reference = _model()
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.state_dict(), source)
    code, _, _ = _pack(capsys, source, tmp_path / "packed", "--codec", codec)
    assert code == 0
    with init_empty_weights():
        model = _model()
    device_map = {"0": "cpu", "1": "cpu", "2": "disk", "3": "disk"}
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "packed", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    inputs = torch.randn(3, 8)
    assert torch.equal(model(inputs), reference(inputs))
    written = [f for f in os.listdir(tmp_path / "offload") if f != _core.INDEX_FILE]
    # Uncompressed shards are served in place; compressed tensors are written decoded.
    assert (written == []) == (codec == "none")


def test_load_checkpoint_and_dispatch_accepts_the_store_index_file(tmp_path):
    torch.manual_seed(0)
    reference = _model()
    write_store(tmp_path / "packed", reference.state_dict())
    with init_empty_weights():
        model = _model()
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "packed" / _core.INDEX_FILE, device_map={"": "cpu"}
    )
    inputs = torch.randn(3, 8)
    assert torch.equal(model(inputs), reference(inputs))
