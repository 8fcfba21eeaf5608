"""The `bigmodel` command line: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from bigmodel import _core
from bigmodel.cli import main
from bigmodel.store import TensorStore, write_store

TENSORS = {
    "embed.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8),
    "layers.0.weight": torch.ones(4, 4, dtype=torch.float16),
    "layers.1.weight": torch.zeros(4, 4, dtype=torch.float16),
}


@pytest.fixture
def store_dir(tmp_path):
    write_store(tmp_path / "store", TENSORS, codec={"embed.weight": "zstd"})
    return tmp_path / "store"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_summarises_the_store(store_dir, capsys):
    code, out, _ = _run(capsys, "inspect", str(store_dir))
    assert code == 0
    assert "tensors:      3" in out
    assert "float16" in out and "zstd" in out


def test_inspect_json(store_dir, capsys):
    code, out, _ = _run(capsys, "inspect", str(store_dir), "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["tensors"] == 3
    assert summary["raw_bytes"] == 64 * 4 + 2 * 16 * 2
    assert summary["codecs"] == {"zstd": 1, "none": 2}
    assert summary["compression_ratio"] > 1.0


def test_ls_filters_with_a_glob(store_dir, capsys):
    code, out, _ = _run(capsys, "ls", str(store_dir), "--pattern", "layers.*", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["name"] for r in rows] == ["layers.0.weight", "layers.1.weight"]
    assert rows[0]["shape"] == [4, 4] and rows[0]["dtype"] == "float16"


def test_ls_prints_one_row_per_tensor(store_dir, capsys):
    code, out, _ = _run(capsys, "ls", str(store_dir))
    assert code == 0
    assert len(out.strip().splitlines()) == 3


def test_verify_passes_on_a_good_store(store_dir, capsys):
    code, out, _ = _run(capsys, "verify", str(store_dir))
    assert code == 0
    assert "all 3 tensors match" in out


def test_verify_fails_with_the_corrupt_tensor_named(store_dir, capsys):
    index = json.loads((store_dir / _core.INDEX_FILE).read_text())
    entry = next(e for e in index["tensors"] if e["name"] == "layers.1.weight")
    shard = store_dir / index["files"][entry["file"]]["path"]
    data = bytearray(shard.read_bytes())
    data[entry["offset"]] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "verify", str(store_dir), "--json")
    assert code == 1
    assert json.loads(out)["corrupt"] == ["layers.1.weight"]


def test_pack_a_safetensors_file(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    code, _, _ = _run(capsys, "pack", str(source), str(tmp_path / "packed"), "--codec", "zstd")
    assert code == 0
    with TensorStore.open(tmp_path / "packed") as store:
        assert all(torch.equal(store[k], v) for k, v in TENSORS.items())
        assert {store.info(k)["codec"] for k in store} == {"zstd"}


def test_pack_a_bin_checkpoint(tmp_path, capsys):
    source = tmp_path / "pytorch_model.bin"
    torch.save(TENSORS, source)
    code, _, _ = _run(capsys, "pack", str(source), str(tmp_path / "packed"))
    assert code == 0
    with TensorStore.open(tmp_path / "packed") as store:
        assert all(torch.equal(store[k], v) for k, v in TENSORS.items())


def test_pack_a_sharded_safetensors_folder(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    safetensors.torch.save_file({"embed.weight": TENSORS["embed.weight"]}, folder / "a.safetensors")
    rest = {k: v for k, v in TENSORS.items() if k != "embed.weight"}
    safetensors.torch.save_file(rest, folder / "b.safetensors")
    weight_map = {"embed.weight": "a.safetensors", **{k: "b.safetensors" for k in rest}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, _ = _run(capsys, "pack", str(folder), str(tmp_path / "packed"))
    assert code == 0
    with TensorStore.open(tmp_path / "packed") as store:
        assert sorted(store) == sorted(TENSORS)


def test_pack_an_accelerate_offload_folder(tmp_path, capsys):
    from accelerate.utils import offload_state_dict

    offload_state_dict(tmp_path / "offload", TENSORS)
    code, _, _ = _run(capsys, "pack", str(tmp_path / "offload"), str(tmp_path / "packed"))
    assert code == 0
    with TensorStore.open(tmp_path / "packed") as store:
        assert all(torch.equal(store[k], v) for k, v in TENSORS.items())


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    code, _, err = _run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2
    assert "missing" in err
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, "ls", str(tmp_path / "notes.txt"))
    assert code == 2
    assert "not a store" in err


def test_python_dash_m_runs_the_cli(store_dir):
    result = subprocess.run(
        [sys.executable, "-m", "bigmodel", "inspect", str(store_dir), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 3
