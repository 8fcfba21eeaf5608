"""Concurrency and files changed under an open store, through the Python ``TensorStore``.

- Eight threads run random get / prefetch / release operations on a store whose budget is
  a third of the working set: every tensor has the right bytes, nothing deadlocks, and the
  resident bytes stay within the budget plus the pinned bytes at every sample.
- Two processes read one store at once; one process replaces a store another is reading.
- A process forked after the store was opened (while another thread uses it) reads it.
- A file truncated, grown or rewritten under an open store (or a mounted checkpoint that
  changed since it was mounted) is an error on the next read: never a SIGBUS, never bytes
  other than the ones written. Those cases run in a forked child, so that a regression
  shows up as a failed test naming the signal instead of a dead test run.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from _robustness import bits_equal, run_in_child

from bigmodel.errors import CorruptStoreError
from bigmodel.store import TensorStore, write_mount, write_store

THREADS = 8
OPERATIONS = 10_000
TENSOR_BYTES = 16 * 1024
DEADLINE_S = 120


def _tensors(seed: int = 0, count: int = 48) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(TENSOR_BYTES // 4, generator=generator) for i in range(count)}


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging():
    """A deadlock dumps every thread's stack and ends the run instead of hanging CI."""
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def mixed_store(tmp_path) -> tuple[Path, dict[str, int]]:
    """48 tensors of 16 KiB, every third one zstd-compressed; and their CRCs."""
    tensors = _tensors()
    codecs = {name: "zstd" for i, name in enumerate(tensors) if i % 3 == 0}
    write_store(tmp_path / "s", tensors, codec=codecs)
    return tmp_path / "s", {name: _crc(t) for name, t in tensors.items()}


# -- Many threads, one store --------------------------------------------------------------


class Worker(threading.Thread):
    """Random get / prefetch / release operations, checking every tensor it gets."""

    def __init__(self, store: TensorStore, crcs: dict[str, int], seed: int):
        super().__init__(daemon=True)
        self.store, self.crcs, self.rng = store, crcs, random.Random(seed)
        self.names = sorted(crcs)
        self.held: list[torch.Tensor] = []
        self.gets = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            for _ in range(OPERATIONS):
                self.step()
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            self.failures.append(f"{type(error).__name__}: {error}")
        self.held.clear()

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.5:
            name = self.rng.choice(self.names)
            tensor = self.store[name]
            self.gets += 1
            if _crc(tensor) != self.crcs[name]:
                self.failures.append(f"{name}: wrong bytes")
            if len(self.held) < 4 and self.rng.random() < 0.5:
                self.held.append(tensor)  # stays pinned until released below
        elif roll < 0.75:
            self.store.prefetch(self.rng.sample(self.names, self.rng.randint(1, 4)))
        elif self.held:
            self.held.pop(self.rng.randrange(len(self.held)))


def _sample_budget(store: TensorStore, budget: int, stop: threading.Event, out: dict) -> None:
    while not stop.is_set():
        stats = store.stats()
        out["samples"] += 1
        if stats["charged_bytes"] > budget + stats["pinned_bytes"]:
            out["violations"].append(stats)
        time.sleep(0.0005)


def test_eight_threads_of_random_operations_stay_correct_and_within_budget(mixed_store):
    root, crcs = mixed_store
    budget = len(crcs) * TENSOR_BYTES // 3
    with TensorStore.open(root, max_resident=budget, read_threads=2) as store:
        workers = [Worker(store, crcs, seed) for seed in range(THREADS)]
        stop, sampled = threading.Event(), {"samples": 0, "violations": []}
        sampler = threading.Thread(target=_sample_budget, args=(store, budget, stop, sampled))
        sampler.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=DEADLINE_S / 2)
        stop.set()
        sampler.join()
        assert not any(w.is_alive() for w in workers), "a worker is stuck: deadlock"
        assert [f for w in workers for f in w.failures] == []
        assert sampled["violations"] == [] and sampled["samples"] > 100, sampled["samples"]
        gc.collect()
        stats = store.stats()
        assert stats["pinned_bytes"] == 0
        assert stats["charged_bytes"] <= budget
        assert stats["hits"] + stats["misses"] == sum(w.gets for w in workers)
        assert stats["evictions"] > 0 and stats["prefetch_requests"] > 0


# -- Several processes ----------------------------------------------------------------------

_READER = textwrap.dedent(
    """
    import sys, zlib
    import torch
    from bigmodel.store import TensorStore
    crcs = {name: int(crc) for name, crc in (pair.split("=") for pair in sys.argv[3:])}
    with TensorStore.open(sys.argv[1], max_resident=int(sys.argv[2])) as store:
        print("ready", flush=True)
        for round_ in range(10):
            for name, crc in crcs.items():
                raw = store[name].reshape(-1).view(torch.uint8).numpy()
                if zlib.crc32(raw) != crc:
                    sys.exit(f"{name}: wrong bytes in round {round_}")
    print("done", flush=True)
    """
)


def test_two_processes_read_one_store_at_once(mixed_store):
    root, crcs = mixed_store
    budget = len(crcs) * TENSOR_BYTES // 4
    pairs = [f"{name}={crc}" for name, crc in crcs.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.Popen(
        [sys.executable, "-c", _READER, str(root), str(budget), *pairs],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert other.stdout.readline().strip() == "ready"
        rounds = 0
        with TensorStore.open(root, max_resident=budget) as store:
            while other.poll() is None or rounds == 0:
                for name, crc in crcs.items():
                    assert _crc(store[name]) == crc, name
                rounds += 1
        output, _ = other.communicate(timeout=DEADLINE_S / 2)
    finally:
        other.kill()
    assert other.returncode == 0 and output.strip() == "done"
    assert rounds > 1  # the two readers really overlapped


def test_a_reader_keeps_its_snapshot_while_another_process_replaces_the_store(mixed_store):
    root, crcs = mixed_store
    with TensorStore.open(root, max_resident=TENSOR_BYTES * 4) as store:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                write_store(root, _tensors(seed=1), progress=False)
                status = 0
            finally:
                os._exit(status)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            for name, crc in crcs.items():
                assert _crc(store[name]) == crc, name
        # The old generation's files are gone from the directory but still served.
        for name, crc in crcs.items():
            assert _crc(store[name]) == crc, name
    with TensorStore.open(root) as replaced:
        assert all(_crc(replaced[n]) == _crc(t) for n, t in _tensors(seed=1).items())


def _read_everything(store: TensorStore, crcs: dict[str, int], inherited: torch.Tensor):
    """In a forked child: checks every tensor, the one inherited pinned, and prefetch."""
    store.prefetch(list(crcs))
    wrong = [name for name, crc in crcs.items() if _crc(store[name]) != crc]
    return wrong, _crc(inherited), store.stats()["misses"]


def test_a_child_forked_while_another_thread_reads_can_read(mixed_store):
    root, crcs = mixed_store
    with TensorStore.open(root, max_resident=len(crcs) * TENSOR_BYTES // 3) as store:
        inherited = store["w1"]
        stop = threading.Event()

        def hammer():
            rng = random.Random(5)
            while not stop.is_set():
                store[rng.choice(list(crcs))]

        busy = threading.Thread(target=hammer)
        busy.start()
        try:
            for _ in range(5):  # several forks, landing at different moments of the hammering
                wrong, inherited_crc, misses = run_in_child(
                    _read_everything, store, crcs, inherited, timeout=DEADLINE_S / 4
                )
                assert wrong == [] and inherited_crc == crcs["w1"]
                assert misses > 0  # the child counts its own reads, from zero
        finally:
            stop.set()
            busy.join()
        assert _crc(store["w1"]) == crcs["w1"]


# -- Files changed under an open store ----------------------------------------------------

OLD_MTIME_NS = 1_000_000_000 * 10**9  # 2001: any later rewrite gives the file a newer mtime


def _settle_mtimes(root: Path) -> None:
    """Backdates every file, so that a rewrite in the same clock tick as the write is still
    seen as a change (file systems keep mtimes at a coarse, jiffy-sized resolution)."""
    for path in root.iterdir():
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def _shard(root: Path) -> Path:
    return next(root.glob("*-shard-*.safetensors"))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _grow(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0" * 4096)


def _rewrite_in_place(path: Path) -> None:
    """Same size, other bytes, same inode: what an editor or `dd conv=notrunc` does."""
    data = bytearray(path.read_bytes())
    for at in range(len(data) // 2, len(data)):
        data[at] ^= 0x5A
    with path.open("r+b") as f:
        f.write(data)


def _change_then_read(root: str, change, read_first: bool, target: str) -> str:
    """In a child: opens the store, optionally reads every tensor, changes ``target``, then
    reads "w1" again; returns what happened."""
    tensors = _tensors()
    with TensorStore.open(root) as store:
        if read_first:
            assert all(bits_equal(store[n], t) for n, t in tensors.items())
            gc.collect()  # nothing stays pinned: the next get must look at the file again
        change(Path(target))
        try:
            tensor = store["w1"]
        except CorruptStoreError as error:
            return f"CorruptStoreError: {error}"
        return "same bytes" if bits_equal(tensor, tensors["w1"]) else "other bytes"


@pytest.mark.parametrize("read_first", [True, False], ids=["resident", "never-read"])
@pytest.mark.parametrize("change", [_truncate, _grow, _rewrite_in_place])
def test_a_shard_changed_under_an_open_store_is_an_error_on_the_next_read(
    tmp_path, change, read_first
):
    write_store(tmp_path / "s", _tensors())
    _settle_mtimes(tmp_path / "s")
    shard = _shard(tmp_path / "s")
    outcome = run_in_child(_change_then_read, str(tmp_path / "s"), change, read_first, str(shard))
    assert outcome.startswith("CorruptStoreError"), outcome
    assert str(shard) in outcome and '"w1"' in outcome


@pytest.mark.parametrize("read_first", [True, False], ids=["resident", "never-read"])
@pytest.mark.parametrize("change", [_truncate, _rewrite_in_place])
def test_a_zstd_blob_changed_under_an_open_store_never_serves_other_bytes(
    tmp_path, change, read_first
):
    write_store(tmp_path / "s", _tensors(), codec="zstd")
    _settle_mtimes(tmp_path / "s")
    blob = next((tmp_path / "s").glob("*-zstd-*.bin"))
    outcome = run_in_child(_change_then_read, str(tmp_path / "s"), change, read_first, str(blob))
    if read_first:
        # A resident decoded copy holds the bytes that were written: serving it is right.
        assert outcome == "same bytes", outcome
    else:
        assert outcome.startswith("CorruptStoreError"), outcome
        assert str(blob) in outcome and '"w1"' in outcome


def _mount_change_read(checkpoint: str, change) -> str:
    tensors = _tensors(count=4)
    with TensorStore.mount([checkpoint]) as store:
        assert bits_equal(store["w1"], tensors["w1"])
        gc.collect()
        change(Path(checkpoint))
        try:
            store["w1"]
        except CorruptStoreError as error:
            return f"CorruptStoreError: {error}"
        return "served"


@pytest.mark.parametrize("change", [_truncate, _rewrite_in_place])
def test_a_mounted_checkpoint_changed_since_the_mount_is_detected(tmp_path, change):
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_tensors(count=4), checkpoint)
    os.utime(checkpoint, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    outcome = run_in_child(_mount_change_read, str(checkpoint), change)
    assert outcome.startswith("CorruptStoreError") and str(checkpoint) in outcome, outcome
    assert '"w1"' in outcome


def test_a_committed_mount_whose_checkpoint_changed_is_refused_at_open(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_tensors(count=4), checkpoint)
    os.utime(checkpoint, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    write_mount(tmp_path / "m", [checkpoint])
    _rewrite_in_place(checkpoint)  # same size: only the modification time tells
    with pytest.raises(CorruptStoreError, match="modified after it was mounted") as caught:
        TensorStore.open(tmp_path / "m")
    assert str(checkpoint) in str(caught.value)


def test_verify_names_the_tensors_of_a_file_truncated_under_an_open_store(tmp_path):
    write_store(tmp_path / "s", _tensors())
    with TensorStore.open(tmp_path / "s") as store:
        shard = _shard(tmp_path / "s")
        os.truncate(shard, shard.stat().st_size - TENSOR_BYTES)
        damaged = store.verify()
    assert damaged and set(damaged) <= set(_tensors())
    assert "w47" in damaged and "w0" not in damaged


def _verify_listing(root: str) -> list[str]:
    with TensorStore.open(root) as store:
        shard = _shard(Path(root))
        shard.unlink()
        os.mkfifo(shard)  # opening a FIFO for reading would block until a writer comes
        return sorted(store.verify())


def test_verify_with_a_fifo_in_place_of_a_shard_lists_its_tensors_without_blocking(tmp_path):
    write_store(tmp_path / "s", _tensors())
    listed = run_in_child(_verify_listing, str(tmp_path / "s"), timeout=20)
    assert listed == sorted(_tensors())
