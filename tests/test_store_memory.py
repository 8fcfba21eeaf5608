"""A budgeted store's memory is real memory: what the process holds (RSS) plus what its reads
leave in the page cache, both within ``max_resident``. Owned tensors are read with direct
I/O, so reading a store larger than the budget leaves neither behind."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from bigmodel import _core
from bigmodel.residency import (
    evict_from_page_cache,
    page_cache_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from bigmodel.store import TensorStore, write_store

MB = 10**6
PAGE = 4096


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _digest(tensor: torch.Tensor) -> str:
    """A hash of the tensor's bytes, computed in place (no copy that would grow RSS)."""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(raw)).hexdigest()


class _Model(Mapping[str, torch.Tensor]):
    """A model's weights made on demand, one tensor at a time: layers of a 4 MiB weight, a
    weight whose size is not a whole number of pages, and a small bias."""

    def __init__(self, layers: int):
        self.shapes = {}
        for layer in range(layers):
            self.shapes[f"{layer}.weight"] = ((1024, 1024), torch.float32)
            self.shapes[f"{layer}.up"] = ((1021, 1037), torch.bfloat16)
            self.shapes[f"{layer}.bias"] = ((1021,), torch.float16)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self.shapes[name]
        return _random(shape, dtype, seed=list(self.shapes).index(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A ~256 MB store and the digest of every tensor written to it."""
    path = tmp_path_factory.mktemp("memory") / "store"
    model = _Model(layers=42)
    write_store(path, model, progress=False)
    return path, {name: _digest(model[name]) for name in model}


def _store_files(store: TensorStore) -> list[str]:
    return [file["path"] for file in store.files()]


def _read_all(store: TensorStore, digests: dict[str, str], ahead: int = 2) -> None:
    """Every tensor in order, prefetching ``ahead``, each checked against its digest."""
    names = list(digests)
    for at, name in enumerate(names):
        store.prefetch(names[at + 1 : at + 1 + ahead])
        assert _digest(store[name]) == digests[name], name


def test_reading_a_store_twice_keeps_rss_and_page_cache_within_the_budget(big_store):
    path, digests = big_store
    budget = 32 * MB
    evict_from_page_cache([path])
    with TensorStore.open(path, max_resident=budget) as store:
        files = _store_files(store)
        assert sum(os.path.getsize(f) for f in files) > 8 * budget
        gc.collect()
        baseline = rss_bytes()
        reset_peak_rss()
        for _ in range(2):
            _read_all(store, digests)
        rss_growth = peak_rss_bytes() - baseline
        left_in_page_cache = page_cache_bytes(files)
        stats = store.stats()
    limit = 1.1 * budget + 64 * MB
    assert rss_growth <= limit, f"peak RSS grew {rss_growth / MB:.0f} MB"
    assert left_in_page_cache <= limit, f"{left_in_page_cache / MB:.0f} MB in the page cache"
    # Read twice from the files, not served from memory the budget does not count.
    assert stats["bytes_read"] >= 2 * sum(os.path.getsize(f) for f in files) - 2 * budget
    assert stats["bytes_from_page_cache"] == 0, "the files were not in the page cache"
    assert stats["peak_resident_bytes"] <= budget + stats["pinned_bytes"] + 8 * MB


@pytest.mark.parametrize(
    ("max_resident", "zero_copy", "reads_leave_page_cache"),
    [
        (None, None, True),  # no budget: zero-copy views of the page cache
        (8 * MB, None, False),  # a budget: owned direct reads
        (8 * MB, True, True),  # views asked for: the page cache keeps what was read
        (None, False, False),  # owned reads asked for
    ],
)
def test_zero_copy_auto_picks_views_without_a_budget_and_direct_reads_with_one(
    tmp_path, max_resident, zero_copy, reads_leave_page_cache
):
    model = _Model(layers=4)
    write_store(tmp_path / "s", model, progress=False)
    evict_from_page_cache([tmp_path / "s"])
    with TensorStore.open(tmp_path / "s", max_resident=max_resident, zero_copy=zero_copy) as s:
        for name in model:
            assert torch.equal(s[name], model[name]), name
        cached = page_cache_bytes(_store_files(s))
    tensor_bytes = sum(model[name].nbytes for name in model)
    if reads_leave_page_cache:
        assert cached >= tensor_bytes
    else:
        assert cached == 0


def _read_by_another_process(files: list[str]) -> None:
    """Fills the page cache with ``files`` as a user's copy or an earlier process would."""
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def _tensors_equal(store: TensorStore, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, expected in tensors.items():
        served = store[name]
        assert torch.equal(served.view(torch.uint8), expected.view(torch.uint8)), name


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_store_already_in_the_page_cache_is_copied_from_it_and_left_as_it_was(tmp_path, codec):
    model = _Model(layers=4)
    tensors = {name: model[name] for name in model}
    write_store(tmp_path / "s", tensors, codec=codec, progress=False)
    with TensorStore.open(tmp_path / "s", max_resident=8 * MB) as store:
        files = _store_files(store)
        evict_from_page_cache(files)
        _read_by_another_process(files)
        cached = page_cache_bytes(files)
        assert cached == sum(os.path.getsize(f) for f in files)
        for _ in range(2):
            _tensors_equal(store, tensors)
        stats = store.stats()
        # Nothing added (the files are whole in the cache) and nothing dropped: the pages
        # were not ours to drop.
        assert page_cache_bytes(files) == cached
        # Evicted, the same store reads from the disk and leaves nothing behind.
        evict_from_page_cache(files)
        _tensors_equal(store, tensors)
        after_eviction = store.stats()
        assert page_cache_bytes(files) == 0
    assert stats["bytes_read"] > sum(os.path.getsize(f) for f in files)  # read twice
    assert stats["bytes_from_page_cache"] == stats["bytes_read"]
    assert after_eviction["bytes_read"] > stats["bytes_read"]
    assert after_eviction["bytes_from_page_cache"] == stats["bytes_from_page_cache"]


def test_a_tensor_partly_in_the_page_cache_is_read_from_the_disk(tmp_path):
    model = _Model(layers=4)
    tensors = {name: model[name] for name in model}
    write_store(tmp_path / "s", tensors, progress=False)
    (shard,) = (tmp_path / "s").glob("*.safetensors")
    offsets = _data_offsets(shard)
    partly, size = "1.weight", tensors["1.weight"].nbytes
    # 2 MiB of the middle of one 4 MiB tensor, on a 2 MiB boundary (no page cache folio of
    # a neighbour straddles it, so its neighbours stay whole in the cache).
    hole = (offsets[partly] + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    assert offsets[partly] <= hole and hole + (2 << 20) <= offsets[partly] + size
    with TensorStore.open(tmp_path / "s", max_resident=8 * MB) as store:
        evict_from_page_cache([shard])
        _read_by_another_process([shard])
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, hole, 2 << 20, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        cached = page_cache_bytes([shard])
        whole_pages = -(-os.path.getsize(shard) // PAGE) * PAGE
        assert cached == whole_pages - (2 << 20)
        _tensors_equal(store, tensors)
        stats = store.stats()
        assert page_cache_bytes([shard]) == cached
    assert stats["bytes_read"] == sum(t.nbytes for t in tensors.values())
    assert stats["bytes_from_page_cache"] == stats["bytes_read"] - size


def test_a_store_in_memory_tmpfs_reads_right_within_the_budget(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this system")
    # tmpfs refuses O_DIRECT on older kernels (the pread fallback) and accepts it on newer
    # ones; either way the values are right and RSS stays within the budget. Its page cache
    # is the file itself, so it is not measured.
    budget = 8 * MB
    model = _Model(layers=10)
    digests = {name: _digest(model[name]) for name in model}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        write_store(Path(shm) / "s", model, progress=False)
        with TensorStore.open(Path(shm) / "s", max_resident=budget) as store:
            baseline = rss_bytes()
            reset_peak_rss()
            for _ in range(2):
                _read_all(store, digests)
            rss_growth = peak_rss_bytes() - baseline
    assert rss_growth <= 1.1 * budget + 64 * MB


def _data_offsets(file: Path) -> dict[str, int]:
    """Absolute file offset of each tensor of a safetensors file (from its header)."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {
        name: 8 + header_len + entry["data_offsets"][0]
        for name, entry in header.items()
        if name != "__metadata__"
    }


def test_unaligned_mounted_safetensors_are_read_aligned_and_leave_nothing_cached(tmp_path):
    # Odd sizes in a row: tensors start at offsets that are neither blocks nor 64 bytes.
    tensors = {}
    for n in range(6):
        tensors[f"{n}.odd"] = _random((3 + n,), torch.float16, seed=100 + n)
        tensors[f"{n}.weight"] = _random((1031, 1031 + n), torch.float32, seed=n)
        tensors[f"{n}.small"] = _random((77, 13), torch.bfloat16, seed=200 + n)
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, file)
    offsets = _data_offsets(file)
    assert any(offset % 64 for offset in offsets.values())
    with TensorStore.mount([file], max_resident=6 * MB) as store:
        # Mounting read the header (with the kernel's readahead): start from a cold file.
        evict_from_page_cache([file])
        for _ in range(2):
            for name, expected in tensors.items():
                served = store[name]
                assert torch.equal(served.view(torch.uint8), expected.view(torch.uint8)), name
                assert served.data_ptr() % 64 == 0, name
    assert page_cache_bytes([file]) == 0


def test_an_accelerate_offload_folder_is_read_directly(tmp_path):
    from accelerate.utils import offload_state_dict

    tensors = {f"layer.{n}": _random((513, 1025 + n), torch.float32, seed=n) for n in range(4)}
    offload_state_dict(tmp_path / "offload", tensors)
    evict_from_page_cache([tmp_path / "offload"])
    with TensorStore.mount(tmp_path / "offload", max_resident=4 * MB) as store:
        for name, expected in tensors.items():
            assert torch.equal(store[name], expected), name
        data_files = [f for f in _store_files(store) if f.endswith(".dat")]
    assert len(data_files) == len(tensors)
    assert page_cache_bytes(data_files) == 0


def test_zstd_tensors_are_decoded_from_direct_reads(tmp_path):
    model = _Model(layers=3)
    tensors = {name: model[name] for name in model}
    tensors["zeros"] = torch.zeros(1 << 20)  # compresses to almost nothing
    write_store(tmp_path / "s", tensors, codec="zstd", progress=False)
    evict_from_page_cache([tmp_path / "s"])
    with TensorStore.open(tmp_path / "s", max_resident=6 * MB) as store:
        assert {store.info(name)["codec"] for name in tensors} == {"zstd"}
        for _ in range(2):
            for name, expected in tensors.items():
                assert torch.equal(store[name], expected), name
        assert page_cache_bytes(_store_files(store)) == 0


def test_the_writer_puts_tensors_of_a_block_or_more_on_a_block(tmp_path):
    model = _Model(layers=3)
    write_store(tmp_path / "s", model, progress=False)
    index = json.loads((tmp_path / "s" / _core.INDEX_FILE).read_text())
    for entry in index["tensors"]:
        alignment = PAGE if entry["length"] >= PAGE else 64
        assert entry["offset"] % alignment == 0, entry["name"]
    # The shard is still a safetensors file with the same bytes.
    (shard,) = (tmp_path / "s").glob("*.safetensors")
    with safetensors.safe_open(shard, framework="pt") as f:
        for name in model:
            assert torch.equal(f.get_tensor(name), model[name]), name


def test_verify_reads_directly_and_leaves_nothing_cached(tmp_path):
    model = _Model(layers=3)
    write_store(tmp_path / "s", model, codec={"0.up": "zstd"}, progress=False)
    evict_from_page_cache([tmp_path / "s"])
    with TensorStore.open(tmp_path / "s") as store:
        assert store.verify() == []
        assert page_cache_bytes(_store_files(store)) == 0
