"""Crash safety: a writer killed with SIGKILL at random points never damages a store.

After each kill the store holds either its previous committed content, bit for bit, or the
new one (the kill came after the commit); a directory that never held a committed store is
an ``IncompleteStoreError`` (or no store at all, when the kill came before the writer created
anything). Whatever dead writers leave behind is removed by the next writer.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest
import torch
from _robustness import bits_equal, run_in_child

from bigmodel import _core
from bigmodel.errors import IncompleteStoreError
from bigmodel.store import TensorStore, write_store

DEADLINE_S = 120
OVERWRITE_TRIALS = 50
FRESH_TRIALS = 12
# More trials, each killing sooner, until one kill has landed mid-write (a write can run faster
# than the calibration measured: then every kill in the first trials came after the commit).
FRESH_TRIALS_MAX = 40
# Several shards and a zstd blob per write, so kills land between many different steps.
CODECS = {"t1": "zstd", "t5": "zstd"}
SHARD_SIZE = 300_000


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging():
    """A deadlock dumps every thread's stack and ends the run instead of hanging CI."""
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _content(seed: int) -> dict[str, torch.Tensor]:
    """Eight 128 KiB tensors whose bytes depend on ``seed`` (so generations differ)."""
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(32 * 1024, generator=generator) for i in range(8)}


def _write_with_the_binding(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    """What ``write_store`` does, minus its progress bar. tqdm guards every bar (even a
    disabled one) with a lock shared between forked processes: a writer killed while it
    holds that lock would leave this test process (and any forked relative) blocked on it."""
    plan = [(name, "F32", [t.numel()], CODECS.get(name, "none")) for name, t in tensors.items()]
    writer = _core.StoreWriter(os.fspath(root), plan, SHARD_SIZE)
    for name, tensor in tensors.items():
        writer.write(name, tensor.numpy().view("uint8"))
    writer.commit()


def _spawn_writer(root: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Forks a process that writes ``tensors`` as the store at ``root`` and exits."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _write_with_the_binding(root, tensors)
            status = 0
        finally:
            os._exit(status)
    return pid


def _write_duration(root: Path) -> float:
    """Median wall time of a complete write by a forked writer (the span kills are drawn from)."""
    durations = []
    for seed in range(3):
        tensors = _content(1000 + seed)
        started = time.perf_counter()
        pid = _spawn_writer(root, tensors)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def _kill_writer_at_random(root: Path, tensors, span: float, rng: random.Random) -> bool:
    """Runs a writer and SIGKILLs it after a random delay; True if it died by the kill."""
    pid = _spawn_writer(root, tensors)
    time.sleep(rng.uniform(0, span))
    os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    return os.WIFSIGNALED(status)


def _holds(root: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the committed store at ``root`` is exactly ``tensors``, bit for bit."""
    with TensorStore.open(root) as store:
        return sorted(store) == sorted(tensors) and all(
            bits_equal(store[name], tensor) for name, tensor in tensors.items()
        )


def _leftovers(root: Path) -> set[str]:
    """Files in ``root`` that neither are the index nor are referenced by it."""
    present = {p.name for p in root.iterdir()}
    try:
        with TensorStore.open(root) as store:
            referenced = {Path(f["path"]).name for f in store.files()}
    except (IncompleteStoreError, FileNotFoundError):
        referenced = set()
    return present - referenced - {_core.INDEX_FILE}


def test_a_killed_overwrite_leaves_the_previous_or_the_new_store(tmp_path):
    root, rng = tmp_path / "store", random.Random(1234)
    span = 0.8 * _write_duration(root)
    committed = _content(0)
    write_store(root, committed, codec=CODECS, shard_size=SHARD_SIZE)
    outcomes = {"previous": 0, "new": 0}
    saw_leftovers = 0
    for trial in range(1, OVERWRITE_TRIALS + 1):
        attempt = _content(trial)
        _kill_writer_at_random(root, attempt, span, rng)
        if _holds(root, committed):
            outcomes["previous"] += 1
            span *= 1.25  # killed before the commit: aim a little later next time
        else:
            assert _holds(root, attempt), f"trial {trial}: neither the old nor the new store"
            committed = attempt
            outcomes["new"] += 1
            span *= 0.8  # the write outran the kill (writes may run faster than calibrated)
        saw_leftovers += bool(_leftovers(root))
    # The kill points spread around the commit (the span adapts): both sides were hit.
    assert outcomes["previous"] > 0 and outcomes["new"] > 0, outcomes
    assert saw_leftovers > 0, "no kill ever left files behind: the test exercised nothing"
    write_store(root, committed, codec=CODECS, shard_size=SHARD_SIZE)
    assert _leftovers(root) == set(), "the next writer did not clean up after dead writers"
    assert _holds(root, committed)


def test_a_killed_first_write_is_incomplete_or_absent_never_partial(tmp_path):
    rng = random.Random(99)
    span = 0.8 * _write_duration(tmp_path / "calibration")
    seen = {"incomplete": 0, "nothing": 0, "new": 0}
    for trial in range(FRESH_TRIALS_MAX):
        if trial >= FRESH_TRIALS and seen["incomplete"] > 0:
            break
        root, attempt = tmp_path / f"fresh-{trial}", _content(trial)
        _kill_writer_at_random(root, attempt, span, rng)
        try:
            assert _holds(root, attempt), f"trial {trial}: a committed store with other bytes"
            seen["new"] += 1
            span *= 0.7  # the write outran the kill: kill sooner next time
        except IncompleteStoreError as error:
            assert str(root) in str(error)
            seen["incomplete"] += 1
        except FileNotFoundError:  # killed before the writer created anything
            assert not root.exists() or _leftovers(root) == set()
            seen["nothing"] += 1
            continue
        write_store(root, attempt, codec=CODECS, shard_size=SHARD_SIZE)
        assert _leftovers(root) == set() and _holds(root, attempt)
    assert seen["incomplete"] > 0, seen


def test_leftovers_of_a_live_writer_are_not_touched(tmp_path):
    """Clean-up removes only dead writers' files: a writer still running keeps its own."""
    root = tmp_path / "store"
    write_store(root, _content(0))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a writer that creates its files, then waits for a byte before committing
        status = 1
        try:
            os.close(write_end)
            writer = _core.StoreWriter(os.fspath(root), [("w", "F32", [1024], "none")], 2**30)
            os.read(read_end, 1)
            writer.write("w", torch.ones(1024).numpy().view("uint8"))
            writer.commit()
            status = 0
        finally:
            os._exit(status)
    os.close(read_end)
    try:
        deadline = time.monotonic() + 10
        while not any(p.name.startswith(".tmp-") for p in root.iterdir()):
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.005)
        write_store(root, _content(1))  # its clean-up must spare the live writer's files
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert _holds(root, {"w": torch.ones(1024)})
    assert _leftovers(root) == set()


@pytest.mark.parametrize("stage", ["before_write", "before_commit"])
def test_a_writer_dropped_without_commit_removes_its_files(tmp_path, stage):
    root = tmp_path / "store"
    write_store(root, _content(0))
    before = {p.name for p in root.iterdir()}
    writer = _core.StoreWriter(os.fspath(root), [("w", "F32", [1024], "zstd")], 2**30)
    if stage == "before_commit":
        writer.write("w", torch.ones(1024).numpy().view("uint8"))
    del writer
    assert {p.name for p in root.iterdir()} == before
    assert _holds(root, _content(0))


def test_fifos_left_in_place_of_the_index_and_a_lock_do_not_hang_the_next_writer(tmp_path):
    """Opening a FIFO for reading blocks until someone writes to it: the writer's clean-up
    (which reads the committed index and probes dead writers' locks) must not."""
    root = tmp_path / "store"
    write_store(root, _content(0))
    (root / _core.INDEX_FILE).unlink()
    os.mkfifo(root / _core.INDEX_FILE)
    os.mkfifo(root / ".tmp-0123456789abcdef.lock")
    run_in_child(_write_with_the_binding, root, _content(1), timeout=30)
    assert _holds(root, _content(1))
