"""`TensorStore` and `write_store`: the Python face of the Rust tensor store.

A store is a directory of safetensors shards (plus zstd blobs) and one JSON index, or an
in-place view ("mount") of safetensors files or an accelerate offload folder. Reading gives
CPU tensors: without a budget, zero-copy views of the files whenever the bytes are stored
uncompressed; with a ``max_resident`` budget, memory of the store's own, read with direct
I/O. Each tensor pins its bytes in the residency cache until the tensor is
garbage-collected, and the cache keeps everything else within the budget.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bigmodel import _core
from bigmodel.errors import TensorNotFoundError
from bigmodel.sizes import parse_size

# safetensors dtype names <-> torch dtypes, for every dtype both support.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_STORE_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}

# Writes smaller than this finish quickly enough that a progress bar would only flicker.
_PROGRESS_MIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    stored_nbytes: int
    file: str
    codec: str


def _byte_budget(size: int | str | None) -> int | None:
    return None if size is None else parse_size(size, "max_resident")


def _names(names: str | Iterable[str]) -> list[str]:
    """A list of tensor names; a single name may be passed as a string."""
    return [names] if isinstance(names, str) else list(names)


class TensorStore(Mapping[str, torch.Tensor]):
    """A read-only ``Mapping[str, torch.Tensor]`` over a store.

    Open a committed store with :meth:`open`, or serve files in place with :meth:`mount`.
    """

    def __init__(self, core: _core.Store, location: str):
        self._core = core
        self.location = location
        self._entries = {
            name: _Entry(_TORCH_DTYPES[dtype], tuple(shape), nbytes, stored, file, codec)
            for name, dtype, shape, nbytes, stored, file, codec in core.entries()
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        max_resident: int | str | None = None,
        read_threads: int = 2,
        verify_reads: bool = False,
        zero_copy: bool | None = None,
        populate_views: bool = True,
    ) -> TensorStore:
        """Opens the store committed in directory ``path``, validating its whole index first.

        ``max_resident`` bounds the bytes kept in RAM: bytes, or a size such as "512MB" or
        "2GiB" (see `bigmodel.sizes`);
        ``verify_reads`` checks every tensor's checksum when it is read.

        ``zero_copy`` chooses how tensors reach memory. The default (``None``) picks views
        without a budget and owned reads with one:

        - views (``True``): uncompressed tensors are views of a private mapping of the files
          (no copy). Their pages belong to the kernel's page cache, so what a budget bounds
          is the pages the store keeps mapped: pages read once stay in the page cache after
          eviction, outside the budget (inside a container with a memory limit they count
          against the limit), until the kernel reclaims them.
        - owned reads (``False``): every tensor is read with direct I/O (``O_DIRECT``;
          ``pread`` then dropping the pages again where the file system refuses it) into a
          page-aligned buffer of the store's own, recycled when the budget forces
          evictions. The budget then bounds the memory the reads really take: nothing is
          left in the page cache. Also use it to modify weights in place, or so that a file
          truncated while the store is open fails a read with an error instead of crashing
          the process (SIGBUS) when a view is touched.

        Either way in-place changes never reach the files; they last until the tensor is
        evicted from the cache. Compressed tensors, and tensors at offsets misaligned for
        their dtype, are always owned reads.

        ``populate_views=False`` hands out zero-copy views without faulting their pages in:
        the first touch reads them. With :meth:`will_need`, a whole model's views can be
        handed out at once and the disk streams them in while the model computes.
        """
        core = _core.Store.open(
            os.fspath(path),
            _byte_budget(max_resident),
            read_threads,
            verify_reads,
            zero_copy=zero_copy,
            populate_views=populate_views,
        )
        return cls(core, os.fspath(path))

    @classmethod
    def mount(
        cls,
        files: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        max_resident: int | str | None = None,
        read_threads: int = 2,
        verify_reads: bool = False,
        zero_copy: bool | None = None,
        populate_views: bool = True,
    ) -> TensorStore:
        """Serves existing files in place, writing nothing.

        ``files`` is a list of safetensors files, or the path of an accelerate offload folder
        (``index.json`` plus one ``.dat`` file per tensor). The options are those of
        :meth:`open`.
        """
        budget = _byte_budget(max_resident)
        if isinstance(files, str | os.PathLike) and Path(files).is_dir():
            folder = os.fspath(files)
            core = _core.Store.mount_offload_folder(
                folder,
                budget,
                read_threads,
                verify_reads,
                zero_copy=zero_copy,
                populate_views=populate_views,
            )
            return cls(core, folder)
        paths = (
            [os.fspath(files)]
            if isinstance(files, str | os.PathLike)
            else list(map(os.fspath, files))
        )
        core = _core.Store.mount_safetensors(
            paths,
            budget,
            read_threads,
            verify_reads,
            zero_copy=zero_copy,
            populate_views=populate_views,
        )
        return cls(core, ", ".join(paths))

    def __deepcopy__(self, memo: dict) -> TensorStore:
        # Read-only and holding OS resources (mappings, read threads): copies share it, so a
        # deep copy of an offloaded model reads the same files.
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader(name)()

    def reader(self, name: str) -> Callable[[], torch.Tensor]:
        """A function that reads ``name`` (as ``store[name]`` does) with its entry looked up
        once: for callers that read the same tensor again and again (offloading hooks)."""
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFoundError(f"tensor {name!r} is not in the store {self.location}")
        dtype, shape, get = entry.dtype, entry.shape, self._core.get
        if entry.nbytes == 0:
            return functools.partial(torch.empty, shape, dtype=dtype)

        def read() -> torch.Tensor:
            # The tensor holds the buffer, which keeps the pinned bytes alive.
            return torch.frombuffer(get(name), dtype=dtype).view(shape)

        return read

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def prefetch(self, names: str | Iterable[str]) -> None:
        """Starts background reads of ``names`` (one name or several) and returns at once."""
        self._core.prefetch(_names(names))

    def will_need(self, names: str | Iterable[str]) -> None:
        """Asks the kernel to start reading ``names`` from disk (page-cache readahead) and
        returns at once; nothing is pinned or counted against the budget. Call it before
        reading many zero-copy views one after the other, so the disk never waits on the
        reader. Tensors read into owned buffers are skipped (use :meth:`prefetch`)."""
        self._core.will_need(_names(names))

    def populate_in_background(self, names: str | Iterable[str]) -> None:
        """Makes the zero-copy views of ``names`` resident on a background thread, in order,
        and returns at once: for a store opened with ``populate_views=False``, whose views
        would otherwise be read on first touch. Nothing is pinned or counted."""
        self._core.populate_in_background(_names(names))

    def info(self, name: str) -> dict:
        """dtype, shape, nbytes, stored_nbytes, file and codec of ``name`` (without reading it)."""
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFoundError(f"tensor {name!r} is not in the store {self.location}")
        return {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "nbytes": entry.nbytes,
            "stored_nbytes": entry.stored_nbytes,
            "file": entry.file,
            "codec": entry.codec,
        }

    def files(self) -> list[dict]:
        """Every file the store reads: path, size, and whether it is mounted (served in place)."""
        return [
            {"path": path, "size": size, "mounted": mounted}
            for path, size, mounted in self._core.files()
        ]

    def stats(self) -> dict[str, int]:
        """Cache counters and byte counts.

        Counters: ``hits``, ``misses``, ``prefetch_requests``, ``prefetch_hits`` (gets served
        by a prefetch), ``prefetch_late`` (gets that found their prefetch still queued and read
        the tensor themselves, at once), ``prefetch_dropped``, ``bytes_read``,
        ``bytes_from_page_cache`` (the part of ``bytes_read`` that owned reads copied from
        pages already in the page cache, put there by another process or a download,
        instead of reading the disk), ``evictions``, ``buffers_reused``, ``wait_ns``.
        Bytes: ``resident_bytes`` is the memory the store holds now (owned buffers, plus the
        pages of resident zero-copy views that are in memory, asked of the kernel with
        ``mincore`` on each call, a page shared by two tensors counted once);
        ``charged_bytes`` is what the budget counts (each tensor at its buffer's capacity, a
        view at its length; a view's pages may hold more), ``peak_resident_bytes``
        the highest ``charged_bytes`` seen, ``pinned_bytes`` the charges of tensors in use,
        ``budget`` the ``max_resident`` in force (None: unlimited).
        """
        return self._core.stats()

    def verify(self) -> list[str]:
        """Checks every checksum; returns the names of the tensors whose bytes do not match."""
        return self._core.verify()

    def close(self) -> None:
        """Stops the read threads. Tensors already returned stay valid."""
        self._core.close()

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorStore({self.location!r}, {len(self)} tensors)"


def write_store(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    codec: str | Mapping[str, str] = "none",
    shard_size: int | str = "2GB",
    progress: bool = True,
) -> None:
    """Writes ``tensors`` as a store in directory ``path``, atomically.

    Readers see either the previous committed content of ``path`` or the new one, never a mix.
    ``codec`` is "none", "zstd", or a mapping from tensor name to one of those (missing names
    are stored uncompressed). Tensors are read one at a time, so ``tensors`` may be a lazy
    mapping (another ``TensorStore``) bigger than RAM.
    """
    shapes = {name: _dtype_and_shape(tensors, name) for name in tensors}
    plan = [_plan_row(name, dtype, shape, codec) for name, (dtype, shape) in shapes.items()]
    nbytes_per_shard = parse_size(shard_size, "shard_size")
    created = not os.path.lexists(path)
    writer = None
    bar = _progress_bar(sum(_nbytes(*shape) for shape in shapes.values()), progress)

    def write_one(name: str) -> None:
        writer.write(name, _raw_bytes(name, tensors[name]))
        if bar is not None:
            bar.update(_nbytes(*shapes[name]))

    try:
        writer = _core.StoreWriter(os.fspath(path), plan, nbytes_per_shard)
        pool = ThreadPoolExecutor(max_workers=2)  # compression runs on both cores
        try:
            for done in [pool.submit(write_one, name) for name in shapes]:
                done.result()
        finally:
            # On an error or Ctrl-C the queued writes are cancelled, not awaited: only the
            # two running finish.
            pool.shutdown(wait=True, cancel_futures=True)
        writer.commit()
    except BaseException:
        # Dropping the writer now removes its temporary files (the traceback would keep it
        # alive until the next garbage collection); a directory made for it goes too.
        writer = None
        if created:
            _remove_if_empty(path)
        raise
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total: int, progress: bool) -> tqdm | None:
    # A bar only when shown: even a disabled tqdm takes a lock that a forked, killed writer
    # could leave held.
    if progress and total >= _PROGRESS_MIN_BYTES:
        return tqdm(total=total, unit="B", unit_scale=True, desc="writing store")
    return None


def _remove_if_empty(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # absent, or holding files that are not ours
        os.rmdir(path)


def write_mount(path: str | os.PathLike, files: Iterable[str | os.PathLike]) -> None:
    """Commits at ``path`` a store that serves the given safetensors files in place.

    Only the index is written (no tensor bytes); the files must not change afterwards (a
    change of size or modification time is detected when the store is opened or read).
    """
    _core.Store.write_mount(os.fspath(path), [os.fspath(f) for f in files])


def _dtype_and_shape(tensors: Mapping[str, torch.Tensor], name: str):
    """dtype and shape of one tensor, without reading it when the source is a store."""
    if isinstance(tensors, TensorStore):
        info = tensors.info(name)
        return info["dtype"], info["shape"]
    tensor = tensors[name]
    return tensor.dtype, tuple(tensor.shape)


def _plan_row(name: str, dtype: torch.dtype, shape: tuple, codec: str | Mapping[str, str]):
    store_dtype = _STORE_DTYPES.get(dtype)
    if store_dtype is None:
        supported = ", ".join(str(d) for d in _STORE_DTYPES)
        raise TypeError(f"tensor {name!r} has dtype {dtype}; a store holds {supported}")
    chosen = codec if isinstance(codec, str) else codec.get(name, "none")
    return name, store_dtype, list(shape), chosen


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _raw_bytes(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view when already contiguous on CPU)."""
    if tensor.device.type == "meta":
        raise ValueError(f"tensor {name!r} is on the meta device: it has no data to write")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
