"""Read-ahead for offloaded models.

A `ForwardOrderPrefetcher` starts from a guess of the order in which offloaded modules run
(their registration order, right for most models), so even the first forward reads ahead.
During the first forward it records the real order, and from then on each offloaded
module's pre-forward asks the store to read the weights of the modules that come next, so
reads overlap compute. The look-ahead is sized in bytes to fit the store's RAM budget. A
module seen out of order just moves the read-ahead to where that module sits; a module never
seen before is appended to the order, so a changed code path costs speed, never correctness.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from bigmodel.hooks import AlignDevicesHook, iter_offload_hooks
from bigmodel.store import TensorStore

# Read-ahead when the store has no byte budget: about two transformer blocks of a 7B model.
DEFAULT_LOOKAHEAD_BYTES = 512 * 2**20

# (hook, bytes of the weights it fetches)
_Step = tuple[AlignDevicesHook, int]


class ForwardOrderPrefetcher:
    """Records the order of offloaded forwards and prefetches the next modules' weights.

    Args:
        guess: ``(module, hook)`` pairs in the order the modules are expected to run.
        lookahead_bytes: bytes of upcoming weights to keep requested ahead of the module
            that is running (the next module is always requested).
    """

    def __init__(
        self,
        guess: list[tuple[nn.Module, AlignDevicesHook]],
        lookahead_bytes: int = DEFAULT_LOOKAHEAD_BYTES,
    ):
        self.lookahead_bytes = lookahead_bytes
        self._recording: list[_Step] | None = []  # None once the first forward is recorded
        self._set_order([(hook, _fetched_bytes(module, hook)) for module, hook in guess])

    @property
    def order(self) -> list[AlignDevicesHook]:
        """The hooks in the order their modules are expected to run."""
        return [hook for hook, _ in self._order]

    def on_pre_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None:
        if self._recording is not None:
            self._record(module, hook)
        position = self._position.get(id(hook))
        if position is None:  # a module on a code path never seen before
            self._set_order([*self._order, (hook, _fetched_bytes(module, hook))])
            return
        # In order, the read-ahead is topped up only every half look-ahead of bytes (a call
        # per module would cost more than it saves); after a jump, at once.
        in_order = position == (self._last + 1) % len(self._order)
        self._last = position
        for store, keys in self._plans[position][0 if in_order else 1]:
            store.prefetch(keys)

    def _record(self, module: nn.Module, hook: AlignDevicesHook) -> None:
        """Appends to the first forward's order; a module running again ends the recording
        (the first forward is complete) and the recorded order replaces the guess."""
        recorded = {id(h) for h, _ in self._recording}
        if id(hook) not in recorded:
            self._recording.append((hook, _fetched_bytes(module, hook)))
            return
        never_ran = [step for step in self._order if id(step[0]) not in recorded]
        self._set_order(self._recording + never_ran)
        self._recording = None

    def _set_order(self, order: list[_Step]) -> None:
        self._order = order
        self._position = {id(hook): i for i, (hook, _) in enumerate(order)}
        self._last = -1
        refills = self._refill_points()
        self._plans = []
        for position in range(len(order)):
            window = self._store_keys(self._window_after(position))
            self._plans.append((window if position in refills else [], window))

    def _refill_points(self) -> set[int]:
        """The positions whose forward tops up the read-ahead when modules run in order: the
        first, then each one that follows at least half the look-ahead of bytes later. Each
        top-up requests its whole window again, so a read the budget dropped is retried."""
        points, since = {0}, 0
        for position, (_, nbytes) in enumerate(self._order):
            if since >= self.lookahead_bytes // 2:
                points.add(position)
                since = 0
            since += nbytes
        return points

    def _window_after(self, position: int) -> list[int]:
        """The positions of the modules that follow ``position`` (wrapping around: the next
        forward starts again at the top), up to ``lookahead_bytes`` (at least one)."""
        count = len(self._order)
        window: list[int] = []
        ahead = 0
        for step in range(1, count):
            window.append((position + step) % count)
            ahead += self._order[window[-1]][1]
            if ahead >= self.lookahead_bytes:
                break
        return window

    def _store_keys(self, positions: list[int]) -> list[tuple[Mapping, list[str]]]:
        """The store reads that fetch the weights of the modules at ``positions``, grouped
        by store, resolved once here so a forward only hands ready lists to the stores."""
        by_store: dict[int, tuple[Mapping, list[str]]] = {}
        for position in dict.fromkeys(positions):
            hook = self._order[position][0]
            for store, keys in _resolve(hook.source_map, hook.source_keys()):
                by_store.setdefault(id(store), (store, []))[1].extend(keys)
        return list(by_store.values())


def _resolve(source: Mapping | None, keys: list[str]) -> list[tuple[Mapping, list[str]]]:
    """Which ``prefetch`` to call with which keys so ``source[key]`` is read ahead: a
    store-backed weights map names its stores; any other source reads ahead itself."""
    resolve = getattr(source, "store_keys", None)
    if resolve is not None:
        return resolve(keys)
    return [(source, keys)] if callable(getattr(source, "prefetch", None)) else []


def _fetched_bytes(module: nn.Module, hook: AlignDevicesHook) -> int:
    """Bytes of the tensors the hook fetches, from the module's placeholders (no read)."""
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
        if isinstance(source, TensorStore):
            stores[id(source)] = source
        for served_by in getattr(source, "sources", {}).values():
            if isinstance(served_by.store, TensorStore):
                stores[id(served_by.store)] = served_by.store
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
    model: nn.Module, lookahead_bytes: int | None = None
) -> ForwardOrderPrefetcher | None:
    """Installs one `ForwardOrderPrefetcher` on every offloading hook of ``model`` whose
    weights come from a store that can read ahead. Returns it (None when there is none).

    ``lookahead_bytes`` defaults to what the smallest store budget holds besides two
    modules' weights (the one running and the one just released; at least half the budget),
    or `DEFAULT_LOOKAHEAD_BYTES` without a budget. A longer read-ahead keeps the disk busy
    through compute; one the budget cannot hold would evict reads before their use.
    """
    guess = [
        (module, hook)
        for _, module, hook in iter_offload_hooks(model)
        if callable(getattr(hook.source_map, "prefetch", None))
    ]
    if not guess:
        return None
    if lookahead_bytes is None:
        budgets = [s.stats()["budget"] for s in offload_stores(model)]
        budgets = [b for b in budgets if b is not None]
        largest = max(_fetched_bytes(module, hook) for module, hook in guess)
        lookahead_bytes = (
            max(min(budgets) // 2, min(budgets) - 2 * largest)
            if budgets
            else DEFAULT_LOOKAHEAD_BYTES
        )
    prefetcher = ForwardOrderPrefetcher(guess, lookahead_bytes)
    for _, hook in guess:
        hook.prefetcher = prefetcher
    return prefetcher
