"""What memory really holds: this process's RSS, and the page cache a set of files occupies.

A RAM budget is only real if both stay within it: the bytes the process holds (RSS) and
the file pages its reads leave in the kernel's page cache (inside a container with a
memory limit, the page cache counts against the limit too). These probes let the demo,
the benchmarks and the tests measure both, on Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Iterable
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def status_kib(field: str, pid: int | str = "self") -> int:
    """A field of ``/proc/PID/status`` in KiB: VmRSS, VmHWM (peak RSS), RssAnon, RssFile."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no field {field!r}")


def rss_bytes() -> int:
    """This process's resident set size in bytes."""
    return status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Restarts the peak RSS (VmHWM) from the current RSS (Linux ``clear_refs``, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """The peak RSS since the process started or since :func:`reset_peak_rss`."""
    return status_kib("VmHWM") * 1024


def mapped_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Bytes of ``paths`` this process maps and has resident (the ``Rss`` of their mappings
    in ``/proc/self/smaps``): pages that count both in the RSS and in the page cache."""
    wanted = {os.path.realpath(path) for path in paths}
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if _MAPPING_HEADER.match(line):  # "start-end perms offset dev inode [path]"
            current = " ".join(fields[5:])
        elif fields and fields[0] == "Rss:" and current in wanted:
            total += int(fields[1]) * 1024
    return total


def page_cache_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Bytes of ``paths`` that sit in the page cache now (``mincore``; whole pages).

    Mapping a file to ask does not read it: ``mincore`` only reports what is resident.
    Missing and empty files count 0.
    """
    return sum(_cached_bytes_of(os.fspath(path)) for path in paths)


def _cached_bytes_of(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            errno = ctypes.get_errno()
            raise OSError(errno, f"mmap for mincore: {os.strerror(errno)}", path)
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vector = ctypes.create_string_buffer(pages)
            if _libc.mincore(address, size, vector) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"mincore: {os.strerror(errno)}", path)
            resident = sum(byte & 1 for byte in vector.raw)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return min(resident * _PAGE, size)


def evict_from_page_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Asks the kernel to drop the clean pages of ``paths`` (files, or folders: every file
    in them) from the page cache (``posix_fadvise(DONTNEED)``): a cold start for one set of
    files, without root. Pages a process still maps stay."""
    for path in map(Path, paths):
        if path.is_dir():
            evict_from_page_cache(path.iterdir())
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
