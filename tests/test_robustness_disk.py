"""Full disks and write errors: a failed write leaves the previous store as it was.

The store is written onto a 1 MiB tmpfs filled to different levels, so the disk runs out
while the shards, the zstd blob or the index are written; separately, a file-size limit
(``RLIMIT_FSIZE``) makes the file system refuse writes past a size. Each failure must be an
``OSError`` naming the file, the previous store must still hold its content bit for bit,
and no temporary file of the failed write may stay behind.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from _robustness import bits_equal, run_in_child

from bigmodel import _core
from bigmodel.store import TensorStore, write_store

PAGE = 4096
DEADLINE_S = 120


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging():
    """A deadlock dumps every thread's stack and ends the run instead of hanging CI."""
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _previous() -> dict[str, torch.Tensor]:
    return {"kept": torch.arange(1024, dtype=torch.float32), "bias": torch.ones(16)}


def _bigger() -> dict[str, torch.Tensor]:
    """384 KiB of random (incompressible) floats in six tensors."""
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(16 * 1024, generator=generator) for i in range(6)}


SHARD_SIZE = 140_000


def _write_bigger(root: Path, codec: str = "none") -> None:
    """Three shards (codec "none") or one zstd blob (codec "zstd"), then the index."""
    write_store(root, _bigger(), codec=codec, shard_size=SHARD_SIZE, progress=False)


def _holds(root: Path, tensors: dict[str, torch.Tensor]) -> bool:
    with TensorStore.open(root) as store:
        return sorted(store) == sorted(tensors) and all(
            bits_equal(store[n], t) for n, t in tensors.items()
        )


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted (lazily if still busy) whatever the test does."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); see the RLIMIT tests")
    try:
        yield mount_point
    finally:
        gc.collect()  # close every mapping of the disk's files before unmounting it
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _fill_leaving(disk: Path, free: int) -> Path:
    """Writes a filler file so that about ``free`` bytes stay free (page granularity)."""
    filler = disk / "filler"
    filler.write_bytes(b"")
    size = max(_free_bytes(disk) - free, 0)
    with filler.open("wb") as f:
        f.write(b"\xff" * size)
    return filler


def _stage_of(error: OSError) -> str:
    """Which of the write's files the disk ran out on: shard, zstd blob, or index."""
    message = str(error)
    for stage in ("shard", "zstd", _core.INDEX_FILE):
        if stage in message:
            return stage
    return message


def _bytes_needed(disk: Path, codec: str) -> int:
    """What the bigger store takes on the disk (tmpfs counts whole pages of data)."""
    before = _free_bytes(disk)
    _write_bigger(disk / "probe", codec)
    used = before - _free_bytes(disk)
    shutil.rmtree(disk / "probe")
    return used


# Each layout writes one kind of data file, so which file the disk fills on is certain.
@pytest.mark.parametrize("codec,data_stage", [("none", "shard"), ("zstd", "zstd")])
def test_a_full_disk_fails_the_write_and_keeps_the_previous_store(small_disk, codec, data_stage):
    root = small_disk / "store"
    needed = _bytes_needed(small_disk, codec)
    write_store(root, _previous())
    committed_files = _names(root)
    stages = set()
    # From no room at all up to one page short: the disk fills while the data files or
    # (with all data written) the index are being written.
    short = [0, PAGE, 16 * PAGE, needed // 3, needed // 2, needed * 4 // 5]
    for free in short + [needed - k * PAGE for k in range(3, 0, -1)]:
        filler = _fill_leaving(small_disk, free)
        try:
            with pytest.raises(OSError) as caught:
                _write_bigger(root, codec)
        finally:
            filler.unlink()
        error = caught.value
        assert error.errno == errno.ENOSPC and str(root) in str(error), error
        stages.add(_stage_of(error))
        del caught, error  # their traceback keeps the failed writer (and its files) alive
        gc.collect()
        assert _names(root) == committed_files, f"leftovers with {free} bytes free"
        assert _holds(root, _previous())
    assert stages == {data_stage, _core.INDEX_FILE}, stages
    _write_bigger(root, codec)  # with the room it needs, the same write succeeds
    assert _holds(root, _bigger())


def _write_under_a_file_size_limit(root: str, limit: int) -> tuple[int, str, list[str]]:
    """In a child: writes the bigger store with files limited to ``limit`` bytes."""
    # Without this, the kernel's answer to a write past the limit is SIGXFSZ (death).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        _write_bigger(Path(root))
    except OSError as error:
        outcome = (error.errno, str(error))
    else:
        outcome = (0, "written")
    gc.collect()
    return (*outcome, sorted(os.listdir(root)) if os.path.exists(root) else None)


# 100 bytes: the first shard header does not fit; 70 000: the shard cannot take its length.
@pytest.mark.parametrize("limit", [100, 70_000])
def test_a_file_size_limit_fails_the_write_and_keeps_the_previous_store(tmp_path, limit):
    root = tmp_path / "store"
    write_store(root, _previous())
    committed_files = sorted(_names(root))
    code, message, left = run_in_child(_write_under_a_file_size_limit, str(root), limit)
    assert code == errno.EFBIG and "File too large" in message, message
    assert str(root) in message
    assert left == committed_files
    assert _holds(root, _previous())


def test_a_failed_write_into_a_new_directory_leaves_nothing(tmp_path):
    code, message, left = run_in_child(_write_under_a_file_size_limit, str(tmp_path / "new"), 100)
    assert code == errno.EFBIG, message
    assert left is None  # the directory the write created is removed with its files


def test_a_read_only_directory_fails_with_a_permission_error_naming_it(tmp_path):
    # Root ignores permission bits, but not a read-only mount: bind-mount the store read-only.
    root = tmp_path / "store"
    write_store(root, _previous())
    bound = subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(root)])
    if bound.returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        with pytest.raises(OSError) as caught:
            _write_bigger(root)
        assert caught.value.errno == errno.EROFS and str(root) in str(caught.value)
        assert _holds(root, _previous())
    finally:
        gc.collect()
        subprocess.run(["umount", str(root)], check=True)
    assert _holds(root, _previous())
