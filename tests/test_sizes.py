"""Sizes in bigmodel's own arguments: one parser (bytes, decimal and binary units, no bits),
used by max_resident=, write_store(shard_size=) and the command line; accelerate's own
functions keep accelerate's parsing."""

from __future__ import annotations

import os

import pytest
import torch
from _cli import run_cli

from bigmodel import _core
from bigmodel.sizes import convert_file_size_to_int, parse_size
from bigmodel.store import TensorStore, write_store


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        ("256MB", 256 * 10**6),
        ("256mb", 256 * 10**6),
        ("256Mb", 256 * 10**6),
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("64 KiB", 64 * 1024),
        ("1.5GB", 1_500_000_000),
        ("100B", 100),
        (100_000_000, 100_000_000),
        ("100000000", 100_000_000),
        (" 42 ", 42),
        (0, 0),
        (2e9, 2_000_000_000),
    ],
)
def test_sizes_are_bytes(value, nbytes):
    assert parse_size(value, "max_resident") == nbytes


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("10XB", "is not a size"),
        ("MB", "is not a size"),
        ("", "is not a size"),
        ("-5MB", "is not a size"),
        ("1e9", "is not a size"),
        (-1, "cannot be negative"),
        (0.5, "not a whole number of bytes"),
        ("0.5B", "not a whole number of bytes"),
        (float("nan"), "is not a size"),
        (True, "is not a size"),
        (None, "is not a size"),
    ],
)
def test_errors_name_the_argument_and_the_value(value, why):
    with pytest.raises(ValueError) as raised:
        parse_size(value, "shard_size")
    assert str(raised.value).startswith(f"shard_size={value!r}")
    assert why in str(raised.value)


def test_accelerate_functions_keep_accelerate_parsing():
    # accelerate reads a lowercase "b" after a decimal unit as bits, and has no TB.
    assert convert_file_size_to_int("256mb") == 32 * 10**6
    with pytest.raises(ValueError):
        convert_file_size_to_int("1TB")


def test_max_resident_of_a_store_is_parsed_as_bytes(tmp_path):
    write_store(tmp_path / "store", {"w": torch.ones(4)})
    with TensorStore.open(tmp_path / "store", max_resident="256mb") as store:
        assert store.stats()["budget"] == 256 * 10**6
    shard = tmp_path / "store" / _shard(tmp_path / "store")
    with TensorStore.mount(shard, max_resident="1TB") as mounted:
        assert mounted.stats()["budget"] == 10**12
    with pytest.raises(ValueError, match="max_resident='lots'"):
        TensorStore.open(tmp_path / "store", max_resident="lots")


def _shard(store) -> str:
    return next(name for name in os.listdir(store) if name.endswith(".safetensors"))


def test_write_store_shard_size_accepts_units(tmp_path):
    tensors = {f"t{i}": torch.zeros(256) for i in range(4)}  # 1 KiB each
    write_store(tmp_path / "store", tensors, shard_size="2KiB")
    shards = [n for n in os.listdir(tmp_path / "store") if n != _core.INDEX_FILE]
    assert len(shards) == 2
    with pytest.raises(ValueError, match="shard_size='2 apples'"):
        write_store(tmp_path / "other", tensors, shard_size="2 apples")
    assert not (tmp_path / "other").exists()


def test_cli_shard_size_accepts_an_integer_and_units(tmp_path):
    write_store(tmp_path / "source", {f"t{i}": torch.zeros(256) for i in range(4)})
    result = run_cli("pack", tmp_path / "source", tmp_path / "a", "--shard-size", "100000000")
    assert result.returncode == 0, result.stderr
    result = run_cli("pack", tmp_path / "source", tmp_path / "b", "--shard-size", "2kib")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "b")) == 3  # two shards and the index


def test_cli_bad_size_is_a_usage_error_naming_the_option(tmp_path):
    result = run_cli("pack", tmp_path / "x", tmp_path / "y", "--shard-size", "2 GB of it")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--shard-size='2 GB of it' is not a size" in result.stderr


def test_max_resident_of_an_offloaded_model_is_parsed_as_bytes(tmp_path):
    from bigmodel import disk_offload
    from bigmodel.prefetch import offload_stats

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    disk_offload(model, tmp_path / "offload", max_resident="256mb")
    assert offload_stats(model)["budget"] == 256 * 10**6
