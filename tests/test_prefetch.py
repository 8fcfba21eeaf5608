"""Read-ahead and residency: the chain of successors it learns, the kept set, the budget,
and forwards of one model from several threads."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from bigmodel import disk_offload
from bigmodel.hooks import iter_offload_hooks
from bigmodel.prefetch import (
    ForwardOrderPrefetcher,
    attach_prefetcher,
    offload_stats,
    offload_stores,
)

WIDTH = 128
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4


class Stack(nn.Module):
    """Linear layers run front to back, or back to front when ``reverse`` is set."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))
        self.reverse = False

    def forward(self, x):
        layers = reversed(self.layers) if self.reverse else self.layers
        for layer in layers:
            x = torch.tanh(layer(x))
        return x


def _offloaded(tmp_path, model_class=Stack, **kwargs):
    torch.manual_seed(0)
    reference = model_class().eval()
    model = model_class().eval()
    model.load_state_dict(reference.state_dict())
    disk_offload(model, tmp_path / "offload", execution_device="cpu", **kwargs)
    return reference, model


def _prefetcher(model: nn.Module) -> ForwardOrderPrefetcher:
    prefetchers = {id(hook.prefetcher): hook.prefetcher for _, _, hook in iter_offload_hooks(model)}
    assert len(prefetchers) == 1, "every offloaded module shares one prefetcher"
    return next(iter(prefetchers.values()))


def _recorded_prefetches(model: nn.Module) -> list[list[str]]:
    """Wraps the model's store so every prefetch call's keys are recorded (in order)."""
    (store,) = offload_stores(model)
    calls: list[list[str]] = []
    original = store.prefetch

    def recording(keys):
        calls.append(list(keys))
        original(keys)

    store.prefetch = recording
    return calls


def _predicted(stats: dict[str, int]) -> int:
    """Gets of tensors the read-ahead asked for: served by its read, or read by the get
    itself when the read threads had not started it yet (the layers here compute in
    microseconds, faster than a read thread gets to the queue)."""
    return stats["prefetch_hits"] + stats["prefetch_late"]


def _unpredicted(stats: dict[str, int]) -> int:
    """Gets that read a tensor the read-ahead had not asked for."""
    return stats["misses"] - stats["prefetch_late"]


def test_read_ahead_follows_the_order_the_model_really_runs(tmp_path):
    # Layers run back to front: registration order is the wrong guess. Half the model fits
    # the budget, so every forward streams, and only a learned order keeps it hitting.
    reference, model = _offloaded(tmp_path, max_resident=3 * LAYER_BYTES)
    reference.reverse = model.reverse = True
    prefetcher = _prefetcher(model)
    hooks = [layer._hf_hook for layer in model.layers]
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
        assert prefetcher.successor(hooks[5]) is hooks[4]
        assert prefetcher.successor(hooks[0]) is hooks[5], "the next forward starts again"
        unpredicted = _unpredicted(offload_stats(model))
        for _ in range(3):
            assert torch.equal(model(x), reference(x))
    stats = offload_stats(model)
    assert _unpredicted(stats) == unpredicted, "every weight of a learned forward was read ahead"
    assert _predicted(stats) >= 3 * 2 * len(hooks)


def test_the_kept_set_makes_each_forward_read_exactly_the_rest(tmp_path):
    depth, budget = 8, 5 * LAYER_BYTES
    reference, model = _offloaded(tmp_path, lambda: Stack(depth), max_resident=budget)
    prefetcher = _prefetcher(model)
    # Two layers stream through the window, one runs: the other two are kept.
    assert prefetcher.lookahead_bytes == 2 * LAYER_BYTES
    assert prefetcher.keep_bytes == 2 * LAYER_BYTES
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        model(x)
        model(x)
        before = offload_stats(model)
        for _ in range(3):
            assert torch.equal(model(x), reference(x))
    stats = offload_stats(model)
    assert prefetcher.kept_bytes == 2 * LAYER_BYTES
    # Counted when a weight is asked for or evicted, not when a background read completes
    # (owned reads go to the disk: one may still be in flight at either snapshot). Each
    # streamed weight is read once per forward (a miss, or a prefetch then used), and a read
    # wasted or repeated would show as one more eviction.
    streamed = 3 * (depth - 2) * 2  # a weight and a bias per streamed layer
    reads = {key: stats[key] - before[key] for key in ("misses", "prefetch_hits", "evictions")}
    assert reads["misses"] + reads["prefetch_hits"] == streamed, reads
    assert reads["evictions"] == streamed, reads
    assert stats["peak_resident_bytes"] <= budget + LAYER_BYTES


class EncoderDecoder(nn.Module):
    """The encoder runs on a call without ``memory`` (the first step of generate()); the
    decoder on every call."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.decoder = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x, memory=None):
        if memory is None:
            memory = x
            for layer in self.encoder:
                memory = torch.tanh(layer(memory))
        for layer in self.decoder:
            x = torch.tanh(layer(x)) + memory
        return x, memory


def test_decode_steps_stop_reading_an_encoder_that_no_longer_runs(tmp_path):
    reference, model = _offloaded(tmp_path, EncoderDecoder, max_resident=2 * LAYER_BYTES)
    calls = _recorded_prefetches(model)
    x = torch.randn(1, WIDTH)
    with torch.no_grad():
        out, memory = model(x)
        expected, _ = reference(x)
        assert torch.equal(out, expected)
        for step in range(6):
            if step == 2:
                calls.clear()  # the chain has seen the decoder's last layer lead back
            out, _ = model(out, memory)
            expected, _ = reference(expected, memory)
            assert torch.equal(out, expected)
    requested = {key for call in calls for key in call}
    assert requested, "decode steps still read ahead"
    assert not {key for key in requested if key.startswith("encoder.")}


class Branchy(Stack):
    """A Stack whose ``head`` layer runs only when ``use_head`` is set."""

    def __init__(self):
        super().__init__(depth=3)
        self.head = nn.Linear(WIDTH, WIDTH)
        self.use_head = False

    def forward(self, x):
        x = super().forward(x)
        return self.head(x) if self.use_head else x


def test_a_module_that_runs_only_sometimes_is_exact_and_learned(tmp_path):
    reference, model = _offloaded(tmp_path, Branchy)
    prefetcher = _prefetcher(model)
    first, last, head = (model.layers[0]._hf_hook, model.layers[-1]._hf_hook, model.head._hf_hook)
    x = torch.randn(1, WIDTH)
    with torch.no_grad():
        for use_head in (False, True, False, True):
            reference.use_head = model.use_head = use_head
            for _ in range(2):  # the second call shows what follows the first one's end
                assert torch.equal(model(x), reference(x))
            assert prefetcher.successor(last) is (head if use_head else first)


def test_read_ahead_respects_the_store_budget(tmp_path):
    budget = 3 * LAYER_BYTES
    _, model = _offloaded(tmp_path, max_resident=budget)
    prefetcher = _prefetcher(model)
    assert (prefetcher.lookahead_bytes, prefetcher.keep_bytes) == (2 * LAYER_BYTES, 0)
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        for _ in range(5):
            model(x)
            stats = offload_stats(model)
            assert stats["charged_bytes"] <= budget + stats["pinned_bytes"]
    stats = offload_stats(model)
    # At most one module is pinned at a time (its forward), so the peak is bounded by it.
    assert stats["peak_resident_bytes"] <= budget + LAYER_BYTES
    assert _predicted(stats) > 0


def test_a_model_that_fits_its_budget_holds_nothing_and_is_read_once(tmp_path):
    _, model = _offloaded(tmp_path, max_resident=10 * LAYER_BYTES)
    prefetcher = _prefetcher(model)
    assert prefetcher.keep_bytes == 0
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert offload_stats(model)["bytes_read"] == 6 * LAYER_BYTES


def test_attach_prefetcher_is_none_without_a_store():
    model = Stack()
    assert attach_prefetcher(model) is None


@pytest.mark.parametrize("budget", [None, 3 * LAYER_BYTES])
def test_threads_running_one_offloaded_model_get_exact_outputs(tmp_path, budget):
    reference, model = _offloaded(tmp_path, max_resident=budget)
    inputs = [torch.randn(2, WIDTH) for _ in range(4)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
    failures: list[str] = []

    def run(worker: int) -> None:
        try:
            with torch.no_grad():
                for round_ in range(25):
                    n = (worker + round_) % len(inputs)
                    if not torch.equal(model(inputs[n]), expected[n]):
                        failures.append(f"worker {worker} round {round_}: wrong output")
        except Exception as error:  # noqa: BLE001 - reported below, with the worker
            failures.append(f"worker {worker}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert offload_stats(model)["pinned_bytes"] == 0
