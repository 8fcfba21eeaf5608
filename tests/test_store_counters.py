"""`stats()["resident_bytes"]` is the memory the store really holds, checked against the
kernel's own accounts: the page cache (``mincore``, `bigmodel.residency`) and the pages
mapped into the process (``Rss`` of the store's file mappings in /proc/self/smaps)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from bigmodel.residency import evict_from_page_cache, page_cache_bytes, status_kib
from bigmodel.store import TensorStore, write_store

MIB = 1 << 20
COUNT = 8
PAGE = os.sysconf("SC_PAGE_SIZE")
# A page fault on a file mapping may also map the cached pages around it, within a window
# of this many bytes (Linux "fault-around", 64 KiB by default).
FAULT_AROUND = 64 << 10


@pytest.fixture
def store_dir(tmp_path):
    tensors = {f"t{i}": torch.full((MIB // 4,), float(i)) for i in range(COUNT)}
    write_store(tmp_path / "s", tensors, progress=False)
    return tmp_path / "s"


def data_files(store: TensorStore) -> list[str]:
    return [f["path"] for f in store.files()]


def mapped_rss(paths: list[str]) -> int:
    """Bytes of ``paths`` mapped into this process now (``Rss`` of their mappings)."""
    wanted = {os.path.realpath(p) for p in paths}
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            counting = len(fields) >= 6 and os.path.realpath(fields[5]) in wanted
        elif counting and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_views_of_a_whole_store_are_its_mapped_pages_and_page_cache(store_dir):
    evict_from_page_cache([store_dir])
    with TensorStore.open(store_dir, read_threads=0, zero_copy=True) as store:
        files = data_files(store)
        held = [store[f"t{i}"] for i in range(COUNT)]
        assert all(bool((t == float(i)).all()) for i, t in enumerate(held))
        resident = store.stats()["resident_bytes"]
        # The writer puts each tensor on its own pages (4096-aligned), after the header.
        assert resident == COUNT * MIB
        # Mapped as well: cached pages of the header next to the first tensor, that a fault
        # maps in around the page it needs.
        assert resident <= mapped_rss(files) <= resident + FAULT_AROUND
        assert resident <= page_cache_bytes(files) <= sum(os.path.getsize(f) for f in files)
        del held


def test_evicted_views_leave_the_count_and_the_process(store_dir):
    budget = 3 * MIB  # three tensors
    evict_from_page_cache([store_dir])
    store = TensorStore.open(store_dir, max_resident=budget, read_threads=0, zero_copy=True)
    with store:
        files = data_files(store)
        for i in range(COUNT):
            assert bool((store[f"t{i}"] == float(i)).all())
        gc.collect()
        stats = store.stats()
        assert stats["evictions"] == COUNT - 3
        assert stats["charged_bytes"] == budget
        # A view holds whole pages: its length, and at most a page more at either end.
        assert budget <= stats["resident_bytes"] <= budget + 3 * 2 * PAGE
        # Mapped: the resident views, plus at most a shared boundary page and a fault-around
        # window beside each tensor.
        slack = COUNT * (PAGE + FAULT_AROUND)
        mapped = mapped_rss(files)
        assert stats["resident_bytes"] <= mapped <= stats["resident_bytes"] + slack
        # What is left in the page cache once it is told to drop our files is what we map.
        evict_from_page_cache(files)
        assert store.stats()["resident_bytes"] == stats["resident_bytes"]
        cached = page_cache_bytes(files)
        assert stats["resident_bytes"] <= cached <= stats["resident_bytes"] + slack
    # Closed: every view is evicted but for the pages it does not fill alone (shared with a
    # neighbour or the header, or the file's last page), which go with the store.
    assert store.stats()["resident_bytes"] == 0
    assert mapped_rss(files) <= (COUNT + 1) * PAGE
    del store
    gc.collect()
    assert mapped_rss(files) == 0


def test_owned_buffers_are_counted_as_the_process_holds_them(store_dir):
    with TensorStore.open(store_dir, read_threads=0, zero_copy=False) as store:
        before = status_kib("RssAnon") * 1024
        held = [store[f"t{i}"] for i in range(COUNT)]
        grown = status_kib("RssAnon") * 1024 - before
        stats = store.stats()
        assert stats["resident_bytes"] == stats["charged_bytes"] == COUNT * MIB
        # The buffers are all the anonymous memory the reads added, give or take the
        # Python objects around them.
        assert stats["resident_bytes"] - MIB <= grown <= stats["resident_bytes"] + 4 * MIB
        del held
