"""Read-ahead and residency for offloaded models.

The budget of the store serving a model's offloaded weights is split in two:

- a *kept set*: the weights of the modules that run most often, held for the model's life
  (up to ``keep_bytes``);
- a *streaming window*: the weights of the modules about to run (up to
  ``lookahead_bytes``), read ahead on the store's threads while the current one computes.

Each forward then reads exactly the offloaded bytes outside the kept set. Least-recently-
used eviction over the whole budget would do worse: a forward visits the layers in the
same cycle every time, so once the budget holds less than one cycle LRU evicts each layer
just before its next use and nothing is ever a hit.

What runs next is learned, not assumed. The prefetcher remembers, for each offloaded
module, which one ran after it last time (starting from registration order, right for most
models, so even the first forward reads ahead) and reads ahead along that chain. The chain
follows the model across calls: in an encoder-decoder's ``generate()``, once the encoder
stops running the decoder's last layer leads back to its first layer, not into the
encoder. A module on a path not seen before is fetched when it is about to run, and the
chain learns the new successor: a misprediction costs a read, never correctness.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bigmodel.hooks import AlignDevicesHook, iter_offload_hooks
from bigmodel.store import TensorStore

# Read-ahead when the store has no byte budget: about two transformer blocks of a 7B model.
DEFAULT_LOOKAHEAD_BYTES = 512 * 2**20

# (store, keys): one `prefetch` call, or the reads that fetch one module's weights
_Reads = list[tuple[Mapping, list[str]]]


@dataclass
class _Step:
    """One offloaded module as the prefetcher sees it."""

    hook: AlignDevicesHook
    module: nn.Module
    nbytes: int  # bytes of the weights its forward fetches from stores
    reads: _Reads  # the store reads that fetch them, resolved once
    runs: int = 0


class ForwardOrderPrefetcher:
    """Learns the order offloaded modules run in, reads the next ones ahead, and keeps the
    most used ones resident (see the module docstring).

    Args:
        guess: ``(module, hook)`` pairs in the order the modules are expected to run.
        lookahead_bytes: bytes of upcoming weights to keep requested ahead of the module
            that is running (the next module is always requested).
        keep_bytes: bytes of weights to hold for the model's life.
    """

    def __init__(
        self,
        guess: list[tuple[nn.Module, AlignDevicesHook]],
        lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES,
        keep_bytes: int = 0,
    ):
        self.lookahead_bytes = lookahead_bytes
        self.keep_bytes = keep_bytes
        self._steps: dict[int, _Step] = {}
        for module, hook in guess:
            self._add(module, hook)
        ids = list(self._steps)
        # id(hook) -> id of the hook that ran after it last time (first guess: wrap around)
        self._next: dict[int, int] = dict(zip(ids, ids[1:] + ids[:1], strict=True))
        self._last: int | None = None
        self._since_refill = 0
        self._windows: dict[int, _Reads] = {}  # cached; cleared when the chain changes
        self._kept: set[int] = set()
        self._held: dict[int, list[torch.Tensor]] = {}
        self._most_runs = 0
        # Forwards of one model are serialised by its hooks' shared lock; this one guards
        # the prefetcher's own state against hooks called from elsewhere.
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        """Bytes of the weights the kept set holds resident now."""
        return sum(self._steps[key].nbytes for key in self._held)

    def successor(self, hook: AlignDevicesHook) -> AlignDevicesHook | None:
        """The hook expected to run after ``hook``."""
        after = self._next.get(id(hook))
        return None if after is None else self._steps[after].hook

    def on_pre_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None:
        with self._lock:
            key = id(hook)
            step = self._steps.get(key) or self._add(module, hook)
            step.runs += 1
            predicted = self._last is not None and self._next.get(self._last) == key
            if self._last is not None and not predicted:
                self._next[self._last] = key
                self._windows.clear()
            self._last = key
            if step.runs > self._most_runs:  # a new cycle starts: re-rank by use
                self._most_runs = step.runs
                self._choose_kept()
            if key in self._kept and key not in self._held:
                self._held[key] = [store[k] for store, keys in step.reads for k in keys]
            # In order, the window is topped up every half look-ahead of bytes (a call per
            # module would cost more than it saves); after a jump, at once.
            if not predicted or self._since_refill >= self.lookahead_bytes // 2:
                for store, keys in self._window(key):
                    store.prefetch(keys)
                self._since_refill = 0
            if key not in self._kept:
                self._since_refill += step.nbytes

    def on_post_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None:
        """The module's weights were just released: the room they held may let the next
        module's reads go ahead that the budget dropped while they were pinned (a layer
        next to the largest module, or a window only one module wide), and the next
        modules' copies to a GPU start (its compute is queued: they overlap it)."""
        with self._lock:
            if self._last != id(hook):
                return  # an enclosing module ends: its successor was requested already
            for store, keys in self._next_reads(id(hook)):
                store.prefetch(keys)
            self._copy_ahead(id(hook))

    def _copy_ahead(self, key: int) -> None:
        """Starts the device copies of the modules after ``key`` in the chain, until the
        device holds as many modules' weights as it may (`CopyWindow`)."""
        position, seen = self._next.get(key), {key}
        while position is not None and position not in seen:
            step = self._steps[position]
            if not step.hook.copy_ahead(step.module):
                return
            seen.add(position)
            position = self._next.get(position)

    def _next_reads(self, key: int) -> _Reads:
        """The reads of the first module after ``key`` in the chain that is not kept."""
        return next((step.reads for step in self._streamed_after(key)), [])

    def _streamed_after(self, key: int) -> Iterator[_Step]:
        """The modules expected after ``key``, following the chain once around, that the
        read-ahead fetches (not kept, served by a store)."""
        position, seen = self._next.get(key), {key}
        while position is not None and position not in seen:
            seen.add(position)
            step = self._steps[position]
            if position not in self._kept and step.reads:
                yield step
            position = self._next.get(position)

    def __deepcopy__(self, memo: dict) -> ForwardOrderPrefetcher:
        """The prefetcher of a deep-copied model: the copied hooks, the same stores, the
        learned chain and use counts; the copy holds nothing until its kept modules run."""
        copied = ForwardOrderPrefetcher([], self.lookahead_bytes, self.keep_bytes)
        new_id = {}
        for key, step in self._steps.items():
            hook = copy.deepcopy(step.hook, memo)
            new_id[key] = id(hook)
            reads = [(copy.deepcopy(store, memo), list(keys)) for store, keys in step.reads]
            module = copy.deepcopy(step.module, memo)
            copied._steps[id(hook)] = _Step(hook, module, step.nbytes, reads, step.runs)
        copied._next = {new_id[a]: new_id[b] for a, b in self._next.items()}
        copied._kept = {new_id[key] for key in self._kept}
        copied._most_runs = self._most_runs
        return copied

    def release(self) -> None:
        """Lets go of the kept set (its weights become evictable)."""
        with self._lock:
            self._held.clear()
            self._kept.clear()
            self.keep_bytes = 0

    def _add(self, module: nn.Module, hook: AlignDevicesHook) -> _Step:
        reads = _resolve(hook.source_map, hook.source_keys())
        step = _Step(hook, module, _read_bytes(reads, module, hook), reads)
        self._steps[id(hook)] = step
        return step

    def _choose_kept(self) -> None:
        """The kept set: the most used modules (earliest registered first among equals)
        whose weights fit ``keep_bytes``."""
        kept, total = set(), 0
        for step in sorted(self._steps.values(), key=lambda s: -s.runs):
            if step.reads and total + step.nbytes <= self.keep_bytes:
                kept.add(id(step.hook))
                total += step.nbytes
        if kept != self._kept:
            for key in self._kept - kept:
                self._held.pop(key, None)
            self._kept = kept
            self._windows.clear()

    def _window(self, key: int) -> _Reads:
        """The store reads of the modules expected after ``key`` (following the chain, kept
        ones skipped), up to ``lookahead_bytes`` (at least one module), grouped by store."""
        window = self._windows.get(key)
        if window is not None:
            return window
        by_store: dict[int, tuple[Mapping, list[str]]] = {}
        ahead = 0
        for step in self._streamed_after(key):
            if ahead >= self.lookahead_bytes:
                break
            ahead += step.nbytes
            for store, keys in step.reads:
                by_store.setdefault(id(store), (store, []))[1].extend(keys)
        window = self._windows[key] = list(by_store.values())
        return window


def _resolve(source: Mapping | None, keys: list[str]) -> _Reads:
    """Which ``prefetch`` to call with which keys so ``source[key]`` is read ahead: a
    store-backed weights map names its stores; any other source reads ahead itself."""
    resolve = getattr(source, "store_keys", None)
    if resolve is not None:
        return resolve(keys)
    return [(source, keys)] if callable(getattr(source, "prefetch", None)) else []


def _read_bytes(reads: _Reads, module: nn.Module, hook: AlignDevicesHook) -> int:
    """Bytes the reads fetch: from the stores' indexes (no read), or for other sources
    from the module's placeholders."""
    if all(isinstance(store, TensorStore) for store, _ in reads):
        return sum(store.info(key)["nbytes"] for store, keys in reads for key in keys)
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return sum(
        tensors[name].numel() * tensors[name].element_size()
        for name in hook.offloaded_names
        if name in tensors
    )


def offload_stores(model: nn.Module) -> list[TensorStore]:
    """The distinct stores that serve the offloaded weights of ``model``'s hooks."""
    stores: dict[int, TensorStore] = {}
    for _, _, hook in iter_offload_hooks(model):
        source = hook.source_map
        # A store serves the hook directly, or behind a weights map that names its stores.
        served_by = source.stores() if callable(getattr(source, "stores", None)) else [source]
        for store in served_by:
            if isinstance(store, TensorStore):
                stores[id(store)] = store
    return list(stores.values())


def offload_stats(model: nn.Module) -> dict[str, int]:
    """The cache counters of every store behind ``model``'s offloaded weights, added up."""
    totals: dict[str, int] = {}
    for store in offload_stores(model):
        for key, value in store.stats().items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def attach_prefetcher(
    model: nn.Module, lookahead_bytes: int | None = None, keep_bytes: int | None = None
) -> ForwardOrderPrefetcher | None:
    """Installs one `ForwardOrderPrefetcher` on every offloading hook of ``model`` whose
    weights come from a store that can read ahead, or are copied to a CUDA device (the
    prefetcher starts those copies ahead). Returns it (None when there is none).

    By default the smallest store budget is split as follows (L: the largest module's
    weights, S: all offloaded weights): when S does not fit, the window gets two modules
    (2 L, or what the budget has besides the running module when that is less) and the
    kept set the rest, besides the running module. When S fits, or without a budget,
    nothing needs holding (the cache keeps all it reads) and the window is the budget, or
    `DEFAULT_LOOKAHEAD_BYTES`.
    """
    guess = [
        (module, hook)
        for _, module, hook in iter_offload_hooks(model)
        if callable(getattr(hook.source_map, "prefetch", None)) or hook.copies_to_device
    ]
    if not guess:
        return None
    prefetcher = ForwardOrderPrefetcher(guess)
    sizes = [step.nbytes for step in prefetcher._steps.values()]
    budgets = [s.stats()["budget"] for s in offload_stores(model)]
    budgets = [b for b in budgets if b is not None]
    window, kept = _split_budget(min(budgets) if budgets else None, max(sizes), sum(sizes))
    prefetcher.lookahead_bytes = window if lookahead_bytes is None else lookahead_bytes
    prefetcher.keep_bytes = kept if keep_bytes is None else keep_bytes
    for _, hook in guess:
        hook.prefetcher = prefetcher
    return prefetcher


def _split_budget(budget: int | None, largest: int, total: int) -> tuple[int, int]:
    """(look-ahead bytes, kept bytes) for a store budget (see `attach_prefetcher`)."""
    if budget is None:
        return DEFAULT_LOOKAHEAD_BYTES, 0
    if total <= budget:
        return budget, 0
    window = max(min(2 * largest, budget - largest), 0)
    return window, max(budget - largest - window, 0)
