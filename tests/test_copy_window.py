"""The bounded window of offloaded modules' copies to a GPU (`CopyWindow`), the read-ahead
that fills it, and the staging pool's sharing rules, with fake streams and events (CPU).
The same paths on a real device: tests/test_gpu_offload.py."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from test_transfer import CountingAllocator, FakeEvent
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from bigmodel import disk_offload, dispatch_model, load_checkpoint_in_model
from bigmodel.hooks import iter_offload_hooks
from bigmodel.transfer import CopyWindow, HostToDevice, StagingPool

KIB = 2**10


class FakeCopier:
    """A `StreamCopier` that copies on the CPU and logs what it would queue on the device:
    ("copy", source pointer), ("copies wait for compute",), ("recorded", event),
    ("compute waits for", event). Events are numbers, in recording order."""

    def __init__(self):
        self.log: list[tuple] = []
        self._events = 0

    def queue_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        self.log.append(("copy", tensor.data_ptr()))
        return tensor.clone()

    def copies_wait_for_compute(self) -> None:
        self.log.append(("copies wait for compute",))

    def record_copies(self) -> int:
        self._events += 1
        self.log.append(("recorded", self._events))
        return self._events

    def compute_waits_for(self, event) -> None:
        self.log.append(("compute waits for", event))


class FakeHostToDevice:
    """What an offloading hook uses of `HostToDevice`: its window."""

    def __init__(self, max_modules: int = 2):
        self.copier = FakeCopier()
        self.window = CopyWindow(self.copier, max_modules)


def _reads(*names: str) -> list:
    return [(name, lambda name=name: torch.full((4,), float(len(name)))) for name in names]


# --------------------------------------------------------------------------------------
# CopyWindow
# --------------------------------------------------------------------------------------


def test_at_most_max_modules_are_staged_or_running():
    window = CopyWindow(FakeCopier(), max_modules=2)
    first, second, third = object(), object(), object()
    assert window.stage(first, _reads("a"))
    assert window.stage(second, _reads("b"))
    assert not window.stage(third, _reads("c"))  # full: nothing queued

    window.take(first, _reads("a"))
    assert not window.stage(third, _reads("c"))  # first runs, second is staged
    window.release(first)
    assert window.stage(third, _reads("c"))

    assert window.modules_in_flight() == 2
    assert window.peak_modules == 2
    assert sum(entry[0] == "copy" for entry in window.copier.log) == 3


def test_copies_wait_for_compute_and_compute_waits_for_the_copies():
    copier = FakeCopier()
    window = CopyWindow(copier, max_modules=2)
    first, second = object(), object()
    window.stage(first, _reads("a", "b"))
    staged_log = list(copier.log)
    window.take(first, _reads("a", "b"))

    # The copy stream waits for the compute queued so far before the module's copies (so
    # they may reuse released weights' memory); one event after them; the compute stream
    # waits for that event when the module runs, and nothing is copied again.
    assert [entry[0] for entry in staged_log] == [
        "copies wait for compute",
        "copy",
        "copy",
        "recorded",
    ]
    assert copier.log[len(staged_log) :] == [("compute waits for", 1)]

    window.release(first)
    window.stage(second, _reads("c"))
    assert copier.log[-3][0] == "copies wait for compute"  # after the release
    assert copier.log[-1] == ("recorded", 2)


def test_a_module_not_staged_copies_itself_and_drops_a_misprediction():
    copier = FakeCopier()
    window = CopyWindow(copier, max_modules=2)
    running, predicted, unexpected = object(), object(), object()
    window.take(running, _reads("a"))
    window.stage(predicted, _reads("b"))

    copies = window.take(unexpected, _reads("c", "d"))

    assert sorted(copies) == ["c", "d"]
    assert torch.equal(copies["c"].tensor, torch.full((4,), 1.0))
    assert window.modules_in_flight() == 2  # the staged misprediction was dropped
    assert copier.log[-1] == ("compute waits for", 3)
    window.release(unexpected)
    window.release(running)
    assert window.modules_in_flight() == 0


def test_weights_missing_from_what_was_staged_are_copied_when_taken():
    copier = FakeCopier()
    window = CopyWindow(copier, max_modules=2)
    owner = object()
    window.stage(owner, _reads("a"))
    copies = window.take(owner, _reads("a", "b"))
    assert sorted(copies) == ["a", "b"]
    assert sum(entry[0] == "copy" for entry in copier.log) == 2
    assert copier.log[-1] == ("compute waits for", 2)  # the later event covers both


def test_nested_forwards_deeper_than_the_window_go_over_it_rather_than_wait():
    window = CopyWindow(FakeCopier(), max_modules=2)
    owners = [object() for _ in range(3)]
    for owner in owners:
        window.take(owner, _reads("w"))
    assert window.modules_in_flight() == 3
    for owner in reversed(owners):
        window.release(owner)
    assert window.modules_in_flight() == 0


def test_a_failed_read_ahead_is_read_again_by_the_forward():
    window = CopyWindow(FakeCopier(), max_modules=2)
    owner = object()

    def failing():
        raise OSError("the disk went away")

    assert window.stage(owner, [("w", failing)])
    assert window.modules_in_flight() == 0  # nothing staged
    with pytest.raises(OSError, match="the disk went away"):
        window.take(owner, [("w", failing)])


def test_the_window_needs_room_for_one_module():
    with pytest.raises(ValueError, match="at least 1"):
        CopyWindow(FakeCopier(), max_modules=0)


# --------------------------------------------------------------------------------------
# An offloaded forward through the window (hooks and read-ahead)
# --------------------------------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self, depth: int = 5, width: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _with_fake_device(model: nn.Module, max_modules: int = 2) -> FakeHostToDevice:
    """Routes every offloading hook of ``model`` through one fake device window, with a
    log entry ("take", module) / ("release", module) around each forward's use of it."""
    fake = FakeHostToDevice(max_modules)
    log = fake.copier.log
    take, release = fake.window.take, fake.window.release
    names = {id(hook): name for name, _, hook in iter_offload_hooks(model)}

    def logged_take(owner, reads):
        log.append(("take", names[id(owner)]))
        return take(owner, reads)

    def logged_release(owner):
        log.append(("release", names[id(owner)]))
        release(owner)

    fake.window.take, fake.window.release = logged_take, logged_release
    for _, _, hook in iter_offload_hooks(model):
        hook._swap.host_to_device = fake
    return fake


def _offloaded_stack(tmp_path):
    torch.manual_seed(0)
    reference = Stack().eval()
    model = Stack().eval()
    model.load_state_dict(reference.state_dict())
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    return reference, model


def test_the_read_ahead_copies_the_next_module_while_the_current_one_runs(tmp_path):
    reference, model = _offloaded_stack(tmp_path)
    fake = _with_fake_device(model)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # learns the order
        first_log = len(fake.copier.log)
        assert torch.equal(model(x), reference(x))

    steady = fake.copier.log[first_log:]
    # Each layer takes copies queued before its predecessor's forward ended (none copied
    # at its own take), two weights per layer, once per forward.
    takes = [i for i, entry in enumerate(steady) if entry[0] == "take"]
    assert [steady[i][1] for i in takes] == [f"layers.{i}" for i in range(5)]
    for i in takes:
        assert steady[i + 1][0] == "compute waits for"
    assert sum(entry[0] == "copy" for entry in steady) == 2 * 5
    # After each release, the next modules' copies start only after the copy stream
    # waits for the compute queued so far.
    for i, entry in enumerate(steady):
        if entry[0] == "copy" and steady[i - 1][0] != "copy":
            assert steady[i - 1] == ("copies wait for compute",)
    assert fake.window.peak_modules == 2


def test_a_window_of_one_module_still_gives_exact_outputs(tmp_path):
    reference, model = _offloaded_stack(tmp_path)
    fake = _with_fake_device(model, max_modules=1)
    x = torch.randn(3, 32)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), reference(x))
    assert fake.window.peak_modules == 1
    assert fake.window.modules_in_flight() == 1  # the first layer, staged for next time


def test_tied_weights_are_copied_through_the_window(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16)
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    model = GPT2LMHeadModel(config).eval()
    model.load_state_dict(reference.state_dict())
    device_map = {"transformer.wte": "disk", "transformer.wpe": "cpu", "transformer.h": "disk"}
    device_map |= {"transformer.ln_f": "cpu", "lm_head": "disk"}
    dispatch_model(model, device_map, main_device="cpu", offload_dir=tmp_path / "offload")
    fake = _with_fake_device(model)
    ids = torch.randint(0, 100, (1, 8))

    fetched = sum(len(hook.offloaded_names) for _, _, hook in iter_offload_hooks(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # learns the order
        for _ in range(2):
            before = len(fake.copier.log)
            assert torch.equal(model(ids).logits, reference(ids).logits)
            copies = sum(entry[0] == "copy" for entry in fake.copier.log[before:])
            assert copies == fetched  # the tied embedding / lm_head weight included

    tied_hooks = [name for name, _, hook in iter_offload_hooks(model) if hook.tied_params_names]
    assert tied_hooks == ["transformer.wte", "lm_head"]
    tied_params_map = next(iter_offload_hooks(model))[2].tied_params_map
    assert all(copies == {} for copies in tied_params_map.values())


# --------------------------------------------------------------------------------------
# Staging pool and pinned memory
# --------------------------------------------------------------------------------------


def test_acquire_waits_when_other_threads_hold_every_buffer():
    pool = StagingPool(CountingAllocator(), 2 * KIB, KIB, KIB)
    held = [pool.acquire(KIB), pool.acquire(KIB)]
    got: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def acquire():
        try:
            got.append(pool.acquire(KIB))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    waiter = threading.Thread(target=acquire)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and errors == [] and got == []  # waiting, not failing

    pool.release(held[0], FakeEvent(done=True))
    waiter.join(timeout=30)
    assert not waiter.is_alive() and errors == []
    assert got[0].data_ptr() == held[0].data_ptr()
    assert pool.stats()["pinned_bytes"] == 2 * KIB


def test_clear_gives_back_every_buffer_not_held():
    pool = StagingPool(CountingAllocator(), 16 * KIB, 4 * KIB, KIB)
    held, done, pending = pool.acquire(KIB), pool.acquire(4 * KIB), pool.acquire(2 * KIB)
    pending_event = FakeEvent()
    pool.release(done, FakeEvent(done=True))
    pool.release(pending, pending_event)

    pool.clear()

    assert pending_event.synchronized == 1  # its copy finished before it was given back
    assert pool.stats()["pinned_bytes"] == KIB  # only the buffer still held
    pool.release(held, FakeEvent(done=True))
    assert pool.acquire(KIB).data_ptr() == held.data_ptr()


def test_the_last_user_of_a_device_gives_its_pinned_memory_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    copier = HostToDevice(0)
    copier.pool = StagingPool(CountingAllocator(), 16 * KIB, 4 * KIB, KIB)
    copier.window = CopyWindow(FakeCopier())

    class User:
        pass

    users = [User(), User()]
    copier.add_user(users[0])
    copier.add_user(users[1])
    copier.window.stage(users[0], _reads("w"))
    copier.pool.release(copier.pool.acquire(4 * KIB), FakeEvent(done=True))

    del users[0]
    gc.collect()
    assert copier.window.modules_in_flight() == 0  # what was staged for it is dropped
    assert copier.pool.stats()["pinned_bytes"] == 4 * KIB  # another user remains
    del users[0]
    gc.collect()
    assert copier.pool.stats()["pinned_bytes"] == 0


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def test_loading_to_a_gpu_does_not_empty_the_cache_per_tensor(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = Stack()
    torch.save(source.state_dict(), tmp_path / "model.bin")
    emptied: list[int] = []
    # Loading to "cuda" needs a GPU: the tensors go to the CPU, while the move primitive
    # is told the device is CUDA (where it would empty the cache if asked to).
    monkeypatch.setattr("bigmodel.tensors._is_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    with torch.device("meta"):
        model = Stack()
    load_checkpoint_in_model(model, tmp_path / "model.bin", device_map={"": "cpu"})
    monkeypatch.undo()
    assert emptied == []
    assert all(
        torch.equal(value, source.state_dict()[name]) for name, value in model.state_dict().items()
    )
