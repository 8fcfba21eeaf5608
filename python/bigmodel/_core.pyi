"""Type stubs of the Rust extension `bigmodel._core` (see rust/py/src)."""

from collections.abc import Buffer
from typing import TypedDict

INDEX_FILE: str
FORMAT_VERSION: int

class TensorBytes:
    """Pinned bytes of one tensor; the pin lasts as long as this object."""

    def __len__(self) -> int: ...
    @property
    def __array_interface__(self) -> dict[str, object]: ...

class StoreStats(TypedDict):
    """`Store.stats()`: counters since the store was opened (see rust/store/src/stats.rs)."""

    hits: int
    misses: int
    prefetch_requests: int
    prefetch_hits: int
    prefetch_late: int
    prefetch_dropped: int
    bytes_read: int
    # The part of bytes_read copied from pages already in the page cache (owned reads).
    bytes_from_page_cache: int
    evictions: int
    buffers_reused: int
    resident_bytes: int
    charged_bytes: int
    peak_resident_bytes: int
    pinned_bytes: int
    wait_ns: int
    budget: int | None

class Store:
    @staticmethod
    def open(
        path: str,
        max_resident: int | None = None,
        read_threads: int = 2,
        verify_reads: bool = False,
        zero_copy: bool | None = None,
        populate_views: bool = True,
    ) -> Store: ...
    @staticmethod
    def mount_safetensors(
        files: list[str],
        max_resident: int | None = None,
        read_threads: int = 2,
        verify_reads: bool = False,
        zero_copy: bool | None = None,
        populate_views: bool = True,
    ) -> Store: ...
    @staticmethod
    def mount_offload_folder(
        folder: str,
        max_resident: int | None = None,
        read_threads: int = 2,
        verify_reads: bool = False,
        zero_copy: bool | None = None,
        populate_views: bool = True,
    ) -> Store: ...
    @staticmethod
    def write_mount(path: str, files: list[str]) -> None: ...
    def entries(self) -> list[tuple[str, str, list[int], int, int, str, str]]: ...
    def files(self) -> list[tuple[str, int, bool]]: ...
    def get(self, name: str) -> TensorBytes: ...
    def prefetch(self, names: list[str]) -> None: ...
    def will_need(self, names: list[str]) -> None: ...
    def populate_in_background(self, names: list[str]) -> None: ...
    def verify(self) -> list[str]: ...
    def stats(self) -> StoreStats: ...
    def close(self) -> None: ...

class StoreWriter:
    def __init__(
        self,
        path: str,
        plan: list[tuple[str, str, list[int], str]],
        shard_size: int,
        zstd_level: int = 3,
    ) -> None: ...
    def write(self, name: str, data: Buffer) -> None: ...
    def commit(self) -> None: ...
