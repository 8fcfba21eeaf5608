"""`zero_copy=False`: every tensor is read into memory of its own, outside the file mappings."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from bigmodel.store import TensorStore, write_store

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-128, 128, shape, generator=generator).to(dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _mapped_ranges(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files under ``directory``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(directory)):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def _layers(count: int) -> dict[str, torch.Tensor]:
    """Layers of two shapes (256 KiB and 384 KiB of float32), like a model's blocks."""
    tensors = {}
    for layer in range(count):
        tensors[f"{layer}.attn"] = torch.full((256, 256), float(layer))
        tensors[f"{layer}.mlp"] = torch.full((384, 256), -float(layer))
    return tensors


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_owned_tensors_equal_the_written_ones_and_lie_outside_the_mappings(tmp_path, codec):
    tensors = {f"t{i}": _random(d, (33, 65), seed=i) for i, d in enumerate(DTYPES)}
    write_store(tmp_path / "s", tensors, codec=codec)
    with TensorStore.open(tmp_path / "s", zero_copy=False) as store:
        held = {name: store[name] for name in tensors}
        ranges = _mapped_ranges(tmp_path)
        for name, tensor in held.items():
            assert _bits_equal(tensor, tensors[name]), name
            assert tensor.data_ptr() % 64 == 0, name
            assert not any(low <= tensor.data_ptr() < high for low, high in ranges), name
        # A resident tensor is served again from the same buffer: no second copy.
        assert store["t0"].data_ptr() == held["t0"].data_ptr()


def test_the_default_is_zero_copy_and_the_owned_mode_is_not(tmp_path):
    write_store(tmp_path / "s", {"w": torch.arange(4096, dtype=torch.float32)})
    with (
        TensorStore.open(tmp_path / "s") as views,
        TensorStore.open(tmp_path / "s", zero_copy=False) as owned,
    ):
        ranges = _mapped_ranges(tmp_path)
        inside = [any(lo <= t["w"].data_ptr() < hi for lo, hi in ranges) for t in (views, owned)]
        assert inside == [True, False]
        assert torch.equal(views["w"], owned["w"])


def test_mounts_serve_owned_copies_too(tmp_path):
    from accelerate.utils import offload_state_dict

    tensors = {f"layer.{i}": _random(torch.bfloat16, (64, 48), seed=i) for i in range(4)}
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, file)
    offload_state_dict(tmp_path / "offload", tensors)
    for source in ([file], tmp_path / "offload"):
        with TensorStore.mount(source, zero_copy=False) as store:
            ranges = _mapped_ranges(tmp_path)
            for name, tensor in tensors.items():
                served = store[name]
                assert _bits_equal(served, tensor), name
                assert not any(lo <= served.data_ptr() < hi for lo, hi in ranges), name


def test_in_place_changes_stay_in_the_cache_until_evicted(tmp_path):
    write_store(tmp_path / "s", {"w": torch.zeros(1000), "other": torch.ones(1000)})
    with TensorStore.open(tmp_path / "s", zero_copy=False, max_resident=4000) as store:
        weight = store["w"]
        weight.add_(2.0)
        del weight
        gc.collect()
        assert torch.equal(store["w"], torch.full((1000,), 2.0)), "the cached copy changed"
        store["other"]  # needs the budget: evicts w
        assert torch.equal(store["w"], torch.zeros(1000)), "read again from the file"
    with TensorStore.open(tmp_path / "s") as store:
        assert torch.equal(store["w"], torch.zeros(1000))


def test_a_budgeted_scan_stays_within_budget_and_reuses_buffers(tmp_path):
    tensors = _layers(8)
    write_store(tmp_path / "s", tensors)
    budget = 2 * (256 + 384) * 1024  # two layers
    with TensorStore.open(tmp_path / "s", zero_copy=False, max_resident=budget) as store:
        served_addresses = set()
        for name, expected in tensors.items():
            tensor = store[name]
            assert torch.equal(tensor, expected), name
            served_addresses.add(tensor.data_ptr())
            stats = store.stats()
            assert stats["charged_bytes"] <= budget + stats["pinned_bytes"]
            del tensor
        stats = store.stats()
        assert stats["evictions"] == len(tensors) - 4  # four tensors fit the budget
        assert stats["buffers_reused"] == stats["evictions"]
        # Only the four first buffers were ever mapped: the rest refilled them.
        assert len(served_addresses) == 4
        assert stats["peak_resident_bytes"] <= budget


def test_prefetched_owned_reads_are_hits_with_the_right_bytes(tmp_path):
    tensors = _layers(6)
    write_store(tmp_path / "s", tensors)
    budget = 3 * (256 + 384) * 1024
    names = list(tensors)
    with TensorStore.open(tmp_path / "s", zero_copy=False, max_resident=budget) as store:
        for at, name in enumerate(names):
            store.prefetch(names[at + 1 : at + 4])
            assert torch.equal(store[name], tensors[name]), name
            stats = store.stats()
            assert stats["charged_bytes"] <= budget + stats["pinned_bytes"]
        stats = store.stats()
        # Every get but the first was read ahead: by a read thread, or by the get itself
        # when it found the read still queued.
        assert stats["prefetch_hits"] + stats["prefetch_late"] == len(names) - 1
        assert stats["buffers_reused"] > 0


_TRUNCATE_UNDER_A_HELD_TENSOR = """
import os, sys, torch
from bigmodel.errors import CorruptStoreError
from bigmodel.store import TensorStore
store = TensorStore.open(sys.argv[1], zero_copy=False)
held = store["held"]
for shard in os.scandir(sys.argv[1]):
    if shard.name.endswith(".safetensors"):
        os.truncate(shard.path, 64)
assert torch.equal(held, torch.arange(1 << 16, dtype=torch.float32))  # no SIGBUS
try:
    store["later"]
except CorruptStoreError as error:
    print("corrupt:", error)
"""


def test_a_file_truncated_under_the_store_is_an_error_not_a_crash(tmp_path):
    tensors = {name: torch.arange(1 << 16, dtype=torch.float32) for name in ("held", "later")}
    write_store(tmp_path / "s", tensors)
    # In a child process: if a view slipped through, touching it would kill the process.
    script = textwrap.dedent(_TRUNCATE_UNDER_A_HELD_TENSOR)
    src = Path(__file__).resolve().parents[1] / "python"
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    assert "corrupt: corrupt store: " in child.stdout
    assert 'tensor "later"' in child.stdout
