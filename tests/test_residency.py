"""The memory probes that budgets are checked with: page cache (mincore) and RSS."""

import os

import pytest

from bigmodel.residency import evict_from_page_cache, mapped_bytes, page_cache_bytes, rss_bytes

SIZE = 8 << 20


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_a_file_just_read_is_in_the_page_cache_and_eviction_drops_it(data_file):
    data_file.read_bytes()
    assert page_cache_bytes([data_file]) == SIZE
    evict_from_page_cache([data_file.parent])
    if page_cache_bytes([data_file]) == SIZE:
        pytest.skip("this file system keeps its pages (tmpfs): eviction cannot be observed")
    assert page_cache_bytes([data_file]) == 0


def test_asking_reads_nothing(data_file):
    evict_from_page_cache([data_file])
    before = page_cache_bytes([data_file])
    assert page_cache_bytes([data_file]) == before


def test_missing_and_empty_files_count_zero(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert page_cache_bytes([tmp_path / "empty", tmp_path / "absent"]) == 0


def test_rss_grows_with_touched_memory():
    before = rss_bytes()
    block = bytearray(64 << 20)  # zero-filled by the allocator: touched
    block[::4096] = b"\1" * len(block[::4096])
    assert rss_bytes() - before >= 60 << 20
    del block


def test_mapped_bytes_count_the_resident_pages_of_this_process_s_mappings(data_file):
    import mmap

    with open(data_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        view[:]  # touch every page
        assert mapped_bytes([data_file]) == SIZE
    assert mapped_bytes([data_file]) == 0
