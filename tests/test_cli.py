"""The `bigmodel` command line: inspect, ls and verify (output, exit codes, damaged stores).

`pack` is tested in test_cli_pack.py, `demo` in test_demo.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import safetensors.torch
import torch
from _cli import assert_clean_failure, cli_command, cli_env, run_cli

from bigmodel import _core
from bigmodel.cli import main
from bigmodel.store import write_store

TENSORS = {
    "embed.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8),
    "layers.0.weight": torch.ones(4, 4, dtype=torch.float16),
    "layers.1.weight": torch.zeros(4, 4, dtype=torch.float16),
}


@pytest.fixture
def store_dir(tmp_path):
    write_store(tmp_path / "store", TENSORS, codec={"embed.weight": "zstd"})
    return tmp_path / "store"


@pytest.fixture
def sharded_store(tmp_path):
    """One shard per tensor, so one file can go missing."""
    write_store(tmp_path / "sharded", TENSORS, shard_size=1)
    return tmp_path / "sharded"


@pytest.fixture
def offload_folder(tmp_path):
    from accelerate.utils import offload_state_dict

    offload_state_dict(tmp_path / "offload", TENSORS)
    return tmp_path / "offload"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _shard_of(store, name: str):
    index = json.loads((store / _core.INDEX_FILE).read_text())
    entry = next(e for e in index["tensors"] if e["name"] == name)
    return store / index["files"][entry["file"]]["path"], entry["offset"]


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_offset(safetensors_file) -> int:
    """The file offset of the data section (after the 8-byte length and the header)."""
    with open(safetensors_file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --------------------------------------------------------------------------------------
# inspect and ls
# --------------------------------------------------------------------------------------


def test_inspect_summarises_the_store(store_dir, capsys):
    code, out, _ = _run(capsys, "inspect", store_dir)
    assert code == 0
    assert "tensors:      3" in out
    assert "float16" in out and "zstd" in out


def test_inspect_json(store_dir, capsys):
    code, out, _ = _run(capsys, "inspect", store_dir, "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["tensors"] == 3
    assert summary["raw_bytes"] == 64 * 4 + 2 * 16 * 2
    assert summary["codecs"] == {"zstd": 1, "none": 2}
    assert summary["compression_ratio"] > 1.0
    assert summary["damaged_files"] == []


def test_ls_filters_with_a_glob(store_dir, capsys):
    code, out, _ = _run(capsys, "ls", store_dir, "--pattern", "layers.*", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["name"] for r in rows] == ["layers.0.weight", "layers.1.weight"]
    assert rows[0]["shape"] == [4, 4] and rows[0]["dtype"] == "float16"


def test_ls_prints_one_row_per_tensor(store_dir, capsys):
    code, out, _ = _run(capsys, "ls", store_dir)
    assert code == 0
    assert len(out.strip().splitlines()) == 3


def test_ls_pattern_matching_nothing_says_so_and_exits_1(store_dir, capsys):
    code, out, err = _run(capsys, "ls", store_dir, "--pattern", "decoder.*")
    assert code == 1
    assert out == ""
    assert "no tensor matches 'decoder.*'" in err


def test_inspect_and_ls_of_a_store_with_a_missing_shard_name_the_file(sharded_store, capsys):
    shard, _ = _shard_of(sharded_store, "layers.0.weight")
    shard.unlink()
    code, out, err = _run(capsys, "inspect", sharded_store)
    assert code == 1
    assert "tensors:      3" in out and f"damaged:    {shard} is missing" in out
    assert f"file {shard} is missing; it holds 'layers.0.weight'" in err
    code, out, err = _run(capsys, "ls", sharded_store)
    assert code == 1
    rows = out.strip().splitlines()
    assert [row.split()[0] for row in rows] == list(TENSORS)
    assert [row.endswith("(file damaged)") for row in rows] == [False, True, False]
    assert str(shard) in err


def test_ls_json_of_a_truncated_shard_marks_its_tensors(sharded_store, capsys):
    shard, _ = _shard_of(sharded_store, "embed.weight")
    os.truncate(shard, shard.stat().st_size - 10)
    code, out, err = _run(capsys, "ls", sharded_store, "--json")
    assert code == 1
    problems = {row["name"]: row.get("file_problem") for row in json.loads(out)}
    assert "truncated" in problems["embed.weight"]
    assert problems["layers.0.weight"] is None
    assert str(shard) in err


def test_ls_of_an_offload_folder_with_a_missing_file(offload_folder, capsys):
    (offload_folder / "layers.1.weight.dat").unlink()
    code, out, err = _run(capsys, "ls", offload_folder)
    assert code == 1
    assert len(out.strip().splitlines()) == 3
    assert "layers.1.weight.dat is missing" in err


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------


def test_verify_passes_on_a_good_store(store_dir, capsys):
    code, out, _ = _run(capsys, "verify", store_dir)
    assert code == 0
    assert "all 3 tensors match their checksums" in out


def test_verify_fails_with_the_corrupt_tensor_named(store_dir, capsys):
    shard, offset = _shard_of(store_dir, "layers.1.weight")
    _flip_byte(shard, offset)
    code, out, _ = _run(capsys, "verify", store_dir, "--json")
    assert code == 1
    assert json.loads(out)["corrupt"] == ["layers.1.weight"]


def test_verify_of_a_safetensors_file_says_there_are_no_checksums(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    _flip_byte(source, _data_offset(source) + 5)  # a data byte: nothing can notice it
    code, out, _ = _run(capsys, "verify", source)
    assert code == 0
    assert "match" not in out
    assert "no checksums to check for 3 tensors" in out
    assert "a damaged data byte cannot be detected" in out
    code, out, _ = _run(capsys, "verify", source, "--json")
    assert json.loads(out) == {"tensors": 3, "checksummed": 0, "corrupt": []}


def test_verify_of_an_offload_folder_says_there_are_no_checksums(offload_folder, capsys):
    _flip_byte(offload_folder / "embed.weight.dat", 0)
    code, out, _ = _run(capsys, "verify", offload_folder)
    assert code == 0
    assert "no checksums to check for 3 tensors" in out and "match" not in out


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_verify_of_a_damaged_shard_fails_naming_the_file(sharded_store, damage, capsys):
    shard, _ = _shard_of(sharded_store, "layers.1.weight")
    if damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 1)
    else:
        shard.unlink()
    code, out, _ = _run(capsys, "verify", sharded_store)
    assert code == 1
    assert out.startswith("verification failed: 1 damaged file(s):")
    assert str(shard) in out and "'layers.1.weight'" in out
    code, out, _ = _run(capsys, "verify", sharded_store, "--json")
    report = json.loads(out)
    assert code == 1
    assert [f["path"] for f in report["damaged_files"]] == [str(shard)]
    assert report["damaged_files"][0]["tensors"] == ["layers.1.weight"]


def test_verify_of_a_truncated_safetensors_file_fails_naming_it(tmp_path):
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, source)
    os.truncate(source, source.stat().st_size - 8)
    result = run_cli("verify", source)
    assert result.returncode == 1
    assert "verification failed" in result.stdout and str(source) in result.stdout
    assert "Traceback" not in result.stderr


def test_verify_of_a_missing_offload_file_fails_naming_it(offload_folder, capsys):
    (offload_folder / "embed.weight.dat").unlink()
    code, out, _ = _run(capsys, "verify", offload_folder)
    assert code == 1
    assert "embed.weight.dat is missing" in out


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    for command in ("inspect", "ls", "verify"):
        code, _, err = _run(capsys, command, tmp_path / "missing")
        assert code == 2
        assert str(tmp_path / "missing") in err
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, "verify", tmp_path / "notes.txt")
    assert code == 2
    assert "not a store" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "verify", tmp_path / "empty")
    assert code == 2
    assert "not a store" in err


def test_a_sharded_checkpoint_missing_a_shard_is_named(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    safetensors.torch.save_file(TENSORS, folder / "a.safetensors")
    weight_map = {name: "a.safetensors" for name in TENSORS} | {"extra": "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = _run(capsys, "inspect", folder)
    assert code == 2
    assert "missing" in err and str(folder / "b.safetensors") in err
    code, out, _ = _run(capsys, "verify", folder)
    assert code == 1
    assert str(folder / "b.safetensors") in out


# --------------------------------------------------------------------------------------
# As a user runs it
# --------------------------------------------------------------------------------------


def test_python_dash_m_runs_the_cli(store_dir):
    result = run_cli("inspect", store_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 3


def test_output_closed_early_is_quiet(tmp_path):
    """`bigmodel ls X | head -1`: no broken-pipe error, the status of a SIGPIPE death."""
    many = {f"layers.{i}.weight": torch.zeros(1) for i in range(20_000)}
    write_store(tmp_path / "store", many)
    process = subprocess.Popen(
        cli_command("ls", tmp_path / "store"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout.readline().startswith(b"layers.0.weight")
    process.stdout.close()
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE
    assert process.stderr.read() == b""


def test_usage_errors_exit_2_in_one_line(store_dir):
    result = run_cli("inspect")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_clean_failure(run_cli("ls", store_dir / "nothing-here"), 2, store_dir / "nothing-here")
