"""Offload hooks under failure: a forward that raises gives back every pin it took.

``tests/test_dispatch.py`` already checks a one-layer model that raises from its forward
(pins released, next forward right). Here the model has six disk-offloaded blocks read
through a small cache with prefetching, and the failure comes from different places:
- an exception, a ``KeyboardInterrupt``, or a real SIGINT, raised in the first, a middle or
  the last block;
- the store, while a block's weights are being loaded (an I/O error after the block's
  first weight was already fetched), or a file truncated under the running model;
- a hundred failing forwards in a row, which must not grow memory: no pinned byte, the
  cache within its budget, no Python object or traced allocation left behind.
After each failure the next forward gives the same output as the model in RAM, bit for bit.
"""

from __future__ import annotations

import copy
import errno
import gc
import os
import signal
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bigmodel.dispatch import disk_offload
from bigmodel.errors import CorruptStoreError
from bigmodel.hooks import iter_offload_hooks, swap
from bigmodel.prefetch import offload_stores
from bigmodel.store import TensorStore

WIDTH = 128
BLOCKS = 6
BLOCK_BYTES = (WIDTH * WIDTH + WIDTH) * 4
BUDGET = 2 * BLOCK_BYTES  # the cache holds two of the six blocks: reads, prefetches, evictions


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.failure: Callable[[], None] | None = None

    def forward(self, x):
        out = torch.relu(self.linear(x))
        if self.failure is not None:
            self.failure()
        return out


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _raise_runtime_error():
    raise RuntimeError("boom")


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _send_sigint():
    """Ctrl-C for real: the signal's handler raises KeyboardInterrupt inside the forward."""
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10_000):  # the handler runs between two of these bytecodes
        pass
    raise AssertionError("SIGINT was not delivered")


FAILURES = {
    "exception": (_raise_runtime_error, RuntimeError),
    "keyboard_interrupt": (_raise_keyboard_interrupt, KeyboardInterrupt),
    "sigint": (_send_sigint, KeyboardInterrupt),
}


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def offloaded(tmp_path) -> tuple[Stack, Stack, TensorStore, torch.Tensor]:
    """The model disk-offloaded with a small budget, its in-RAM twin, its store, an input."""
    torch.manual_seed(0)
    model = Stack().eval()
    reference = copy.deepcopy(model)
    disk_offload(model, tmp_path / "offload", "cpu", max_resident=BUDGET)
    (store,) = offload_stores(model)
    return model, reference, store, torch.randn(3, WIDTH)


def _assert_everything_released(model: nn.Module, store: TensorStore) -> None:
    gc.collect()  # a caught exception's traceback forms cycles that hold frames' locals
    for name, module, hook in iter_offload_hooks(model):
        assert hook._swap.onloads == [], f"{name}: a forward's loads were never undone"
        for tensor_name, tensor in module.named_parameters(recurse=False):
            assert tensor.device.type == "meta", f"{name}.{tensor_name} stayed loaded"
    stats = store.stats()
    assert stats["pinned_bytes"] == 0, stats
    assert stats["charged_bytes"] <= BUDGET, stats


def _forward_fails(model: nn.Module, x: torch.Tensor, block: int, failure: str) -> None:
    trigger, error = FAILURES[failure]
    model.blocks[block].failure = trigger
    try:
        with pytest.raises(error):
            model(x)
    finally:
        model.blocks[block].failure = None


@pytest.mark.parametrize("block", [0, 2, BLOCKS - 1])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failing_forward_releases_every_pin_and_the_next_one_works(offloaded, block, failure):
    model, reference, store, x = offloaded
    expected = reference(x)
    assert torch.equal(model(x), expected)  # records the order the prefetcher follows
    _forward_fails(model, x, block, failure)
    _assert_everything_released(model, store)
    assert torch.equal(model(x), expected)
    _assert_everything_released(model, store)


def _python_footprint() -> tuple[int, int]:
    gc.collect()
    return len(gc.get_objects()), tracemalloc.get_traced_memory()[0]


def test_a_hundred_failing_forwards_grow_no_memory(offloaded):
    model, reference, store, x = offloaded
    expected = reference(x)
    kinds = sorted(FAILURES)

    def fail(round_: int) -> None:
        _forward_fails(model, x, round_ % BLOCKS, kinds[round_ % len(kinds)])

    for round_ in range(10):  # warm-up: first-use caches (prefetch order, torch) fill here
        fail(round_)
    tracemalloc.start()
    try:
        objects_before, traced_before = _python_footprint()
        for round_ in range(100):
            fail(round_)
            assert store.stats()["charged_bytes"] <= BUDGET + store.stats()["pinned_bytes"]
        objects_after, traced_after = _python_footprint()
    finally:
        tracemalloc.stop()
    _assert_everything_released(model, store)
    # A leak of one tensor (or of one traceback's frames) per forward would add 100 of them.
    assert objects_after - objects_before < 50, (objects_before, objects_after)
    assert traced_after - traced_before < 64 * 1024, (traced_before, traced_after)
    assert torch.equal(model(x), expected)


class FlakyStore:
    """Delegates to a store, but raises an I/O error for ``key`` while ``broken``."""

    def __init__(self, store: TensorStore, key: str):
        self.store, self.key, self.broken = store, key, True

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.broken and key == self.key:
            raise OSError(errno.EIO, f"injected read error on {key}")
        return self.store[key]

    def prefetch(self, names) -> None:
        self.store.prefetch(names)


def _break_reads_of(model: Stack, name: str, store: TensorStore) -> FlakyStore:
    """Serves ``name`` through a `FlakyStore` (broken at first). Hooks resolve their
    sources on their first forward, so this must come before it."""
    flaky = FlakyStore(store, name)
    for _, _, hook in iter_offload_hooks(model):
        sources = getattr(hook.source_map, "sources", {})
        if name in sources:
            sources[name] = sources[name]._replace(store=flaky)
    return flaky


def test_a_store_error_while_a_block_loads_releases_what_it_had_loaded(offloaded):
    model, reference, store, x = offloaded
    expected = reference(x)
    # The bias loads after the weight: the failure comes with the weight already pinned.
    flaky = _break_reads_of(model, "blocks.3.linear.bias", store)
    flaky.broken = False
    model(x)
    flaky.broken = True
    for _ in range(3):
        with pytest.raises(OSError, match="injected read error"):
            model(x)
        _assert_everything_released(model, store)
    flaky.broken = False
    assert torch.equal(model(x), expected)
    _assert_everything_released(model, store)


def test_a_file_truncated_under_a_running_model_is_a_clear_error(offloaded, tmp_path):
    model, _, store, x = offloaded
    model(x)
    shard = Path(store.info("blocks.4.linear.weight")["file"])
    os.truncate(shard, shard.stat().st_size // 2)
    for _ in range(3):  # every later forward fails the same way, none crashes
        with pytest.raises(CorruptStoreError) as caught:
            model(x)
        assert str(shard) in str(caught.value) and "blocks." in str(caught.value)
        del caught
        _assert_everything_released(model, store)


@pytest.mark.parametrize("restore_call", [1, 2])
def test_an_interrupt_while_weights_are_put_back_still_puts_them_all_back(
    offloaded, monkeypatch, restore_call
):
    """Ctrl-C landing inside post_forward, between restoring a block's weight and its bias."""
    model, reference, store, x = offloaded
    expected = reference(x)
    assert torch.equal(model(x), expected)
    put_back, calls = swap._put_back, []

    def interrupted_once(fetch, tensor):
        calls.append(fetch.name)
        if len(calls) == restore_call:
            raise KeyboardInterrupt
        put_back(fetch, tensor)

    monkeypatch.setattr(swap, "_put_back", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    monkeypatch.setattr(swap, "_put_back", put_back)
    _assert_everything_released(model, store)
    assert torch.equal(model(x), expected)
