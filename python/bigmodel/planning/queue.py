"""The entries waiting to be placed (`Queue`), and the room kept for the largest of their
layers (`LayerReserve`), each change O(1) or O(log n) where accelerate rescans lists."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from bigmodel.planning.module_sizes import Size
from bigmodel.planning.tree import Entry, ModuleTree


class QueueListener:
    """Told about every entry that enters or leaves the queue.

    ``part_of`` names the entry that a new entry was split from (None for a new entry).
    """

    def entered(self, name: str, obj: nn.Module | torch.Tensor, part_of: str | None) -> None: ...

    def left(self, name: str, obj: nn.Module | torch.Tensor) -> None: ...


class Queue:
    """Entries in placement order: a doubly linked list indexed by name.

    Pop/push at the front, removal and in-place replacement of any entry are O(1) per entry
    (accelerate rebuilds or scans a Python list for each of these).
    """

    _END = None  # sentinel: _next[_END] is the first entry, _prev[_END] the last

    def __init__(self, entries: Iterable[Entry], listener: QueueListener | None = None) -> None:
        self._objects: dict[str, nn.Module | torch.Tensor] = {}
        self._next: dict[str | None, str | None] = {self._END: self._END}
        self._prev: dict[str | None, str | None] = {self._END: self._END}
        self._listener = listener or QueueListener()
        self._insert_after(self._END, entries, part_of=None)

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[Entry]:
        name = self._next[self._END]
        while name is not self._END:
            yield name, self._objects[name]
            name = self._next[name]

    def get(self, name: str) -> nn.Module | torch.Tensor:
        return self._objects[name]

    def pop_front(self) -> Entry:
        name = self._next[self._END]
        return name, self.remove(name)

    def push_front(self, entries: Iterable[Entry]) -> None:
        self._insert_after(self._END, entries, part_of=None)

    def replace(self, name: str, parts: Iterable[Entry]) -> None:
        """Puts ``parts`` (what ``name`` is split into) where ``name`` is, and removes it."""
        self._insert_after(self._prev[name], parts, part_of=name)
        self.remove(name)

    def move_to_front(self, name: str) -> None:
        """Moves an entry to the front; it does not leave the queue (no listener call)."""
        self._unlink(name)
        self._link_after(self._END, name)

    def remove(self, name: str) -> nn.Module | torch.Tensor:
        self._unlink(name)
        obj = self._objects.pop(name)
        self._listener.left(name, obj)
        return obj

    def _insert_after(
        self, anchor: str | None, entries: Iterable[Entry], part_of: str | None
    ) -> None:
        for name, obj in entries:
            if name in self._objects:
                raise RuntimeError(f"{name} is already waiting to be placed")
            self._objects[name] = obj
            self._link_after(anchor, name)
            self._listener.entered(name, obj, part_of)
            anchor = name

    def _link_after(self, anchor: str | None, name: str) -> None:
        after = self._next[anchor]
        self._prev[name], self._next[name] = anchor, after
        self._next[anchor] = self._prev[after] = name

    def _unlink(self, name: str) -> None:
        before, after = self._prev.pop(name), self._next.pop(name)
        self._next[before], self._prev[after] = after, before


# --------------------------------------------------------------------------------------------
# The room kept for the largest remaining layer


class LayerReserve(QueueListener):
    """accelerate's "largest layer" reserve, reproduced exactly in O(log n) per change.

    accelerate keeps ``size`` (the largest layer among the waiting modules when last computed)
    and the names of the layers of that size. Treating an entry removes it and its sublayers
    from those names; ``size`` is recomputed only when no name is left or after a split, so it
    is sometimes stale (a tied module placed with another entry keeps its names listed), and
    the maps depend on that.

    Here only the *number* of those layers is kept: the waiting modules are bucketed by their
    largest layer (with the number of layers of that size), a max-heap of bucket sizes gives
    the maximum, and a generation number tells whether a treated entry was waiting (itself,
    or the module it was split from) when the names were last computed.
    """

    def __init__(self, tree: ModuleTree) -> None:
        self._tree = tree
        self._modules_by_largest: dict[Size, int] = {}  # largest layer -> waiting modules
        self._layers_by_largest: dict[Size, int] = {}  # largest layer -> layers of that size
        self._sizes_heap: list[Size] = []  # negated sizes; may hold sizes of empty buckets
        self._generation = 0  # number of recomputations so far
        self._waiting_since: dict[str, int] = {}  # entry -> generation when it started waiting
        self._counted_tensors: set[str] = set()
        self.size: Size = 0
        self._remaining = 0  # layers of `size` counted at the last recomputation, not yet treated

    def entered(self, name: str, obj: nn.Module | torch.Tensor, part_of: str | None) -> None:
        since = self._generation if part_of is None else self._waiting_since[part_of]
        self._waiting_since[name] = since
        if isinstance(obj, nn.Module):
            largest, count = self._tree.largest_layers(name)
            if not self._modules_by_largest.get(largest):
                heapq.heappush(self._sizes_heap, -largest)
            self._modules_by_largest[largest] = self._modules_by_largest.get(largest, 0) + 1
            self._layers_by_largest[largest] = self._layers_by_largest.get(largest, 0) + count

    def left(self, name: str, obj: nn.Module | torch.Tensor) -> None:
        if isinstance(obj, nn.Module):
            largest, count = self._tree.largest_layers(name)
            self._modules_by_largest[largest] -= 1
            self._layers_by_largest[largest] -= count

    def recompute(self, waiting_tensors: Iterable[Entry] = ()) -> None:
        """Largest layer among the waiting modules (and ``waiting_tensors``, at the start)."""
        self._generation += 1
        heap = self._sizes_heap
        while heap and not self._modules_by_largest[-heap[0]]:
            heapq.heappop(heap)
        tensor_sizes = {name: self._tree.size(name) for name, _ in waiting_tensors}
        self.size = max([-heap[0] if heap else 0, *tensor_sizes.values()])
        self._counted_tensors = {name for name, size in tensor_sizes.items() if size == self.size}
        modules_count = self._layers_by_largest.get(self.size, 0)
        self._remaining = modules_count + len(self._counted_tensors)

    def popped(self, name: str, obj: nn.Module | torch.Tensor) -> None:
        """An entry is being treated: its layers no longer count as remaining largest ones."""
        if name in self._counted_tensors:
            self._counted_tensors.discard(name)
            self._remaining -= 1
        elif isinstance(obj, nn.Module) and self._waiting_since[name] < self._generation:
            largest, count = self._tree.largest_layers(name)
            if largest == self.size:
                self._remaining -= count
        if self._remaining == 0:
            self.recompute()
