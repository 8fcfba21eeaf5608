"""`infer_auto_device_map` and the device-map checks.

The planner gives the same maps as accelerate 1.15 (same keys, values and key order) in time
linear in the number of modules, where accelerate's is quadratic:

- the model is walked once (`ModelScan`): sizes, tied parameters and the module tree come
  from that walk, and every module's largest layer is computed once (`_ModuleTree`);
- the waiting entries live in a linked list indexed by name (`_Queue`): popping, pushing
  back, removing a tied module and splitting a module in place cost O(1) per entry;
- the room kept on the main devices for "the largest remaining layer" (`_LayerReserve`)
  comes from a max-heap of the waiting modules' largest layers, where accelerate re-walks
  every waiting module after each split and filters a list of names after each placement;
- tied modules are found by walking up a name's parents in the queue index;
- `clean_device_map` and `check_device_map` use a prefix tree / prefix lookups instead of
  rescanning all keys for every key.

Differences from accelerate are listed in docs/compatibility.md (planning section): the
direct buffers of a split module stay in the map, fractional budgets work with
``fallback_allocation``, ties and doubly registered modules that make accelerate raise
IndexError are planned, and ``verbose=True`` logs at INFO instead of printing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from bigmodel.budget import remember_planned_budget
from bigmodel.memory import (
    DeviceKey,
    DtypeLike,
    ModelScan,
    Size,
    compute_module_total_buffer_size,
    convert_file_size_to_int,
    get_max_memory,
    get_module_leaves,
)
from bigmodel.tied import check_tied_parameters_in_config, tied_parameter_groups

logger = logging.getLogger(__name__)

__all__ = [
    "check_device_map",
    "clean_device_map",
    "fallback_allocate",
    "get_module_leaves",
    "get_module_size_with_ties",
    "infer_auto_device_map",
]

DeviceMapValue = int | str | torch.device
_OFFLOADED = ("cpu", "disk")  # devices whose modules run elsewhere (buffers excepted)
# A unit of placement: a module, or a parameter/buffer of a module that was split.
Entry = tuple[str, nn.Module | torch.Tensor]


# --------------------------------------------------------------------------------------------
# Model structure, computed once per name


class _SizeLookup(Mapping[str, Size]):
    """Module and tensor sizes from separate tables (a module never has a tensor's name)."""

    def __init__(self, *tables: dict[str, Size]) -> None:
        self._tables = tables

    def __getitem__(self, name: str) -> Size:
        for table in self._tables:
            size = table.get(name)
            if size is not None:
                return size
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        for table in self._tables:
            yield from table

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables)


class _ModuleTree:
    """Children, sizes and largest layers of the model's modules, looked up by dotted name.

    A *layer* is what `get_max_layer_size` counts: a module without children or an instance of
    a no-split class. Results are cached by name (a module shared under two names has two
    different sizes: its tensors are counted under the first name only).
    """

    def __init__(self, module_sizes: Mapping[str, Size], no_split: Iterable[str]) -> None:
        self.sizes = module_sizes
        self._no_split = frozenset(no_split)
        self._children: dict[str, list[Entry]] = {}
        self._largest_layers: dict[str, tuple[Size, int]] = {}

    @classmethod
    def from_scan(cls, scan: ModelScan, no_split: Iterable[str]) -> _ModuleTree:
        """The whole model's tree, with every module's largest layers computed up front."""
        module_sizes = scan.subtree_bytes()
        tree = cls(_SizeLookup(module_sizes, scan.parameter_bytes, scan.buffer_bytes), no_split)
        tree._children = scan.children
        # Layers are modules: their sizes are in the (smaller, plain) module table.
        tree._compute_largest_layers(scan.paths, module_sizes.get)
        return tree

    def size(self, name: str) -> Size:
        return self.sizes.get(name, 0)

    def children(self, name: str, module: nn.Module) -> list[Entry]:
        """The module's children with full names (cached).

        Unlike ``named_children()``, a module registered twice in one parent is listed under
        both names, so that the map covers both names of its tensors (accelerate skips the
        second name and then raises IndexError on the tie between the two).
        """
        children = self._children.get(name)
        if children is None:  # not scanned (public helpers): read it from the module
            prefix = f"{name}." if name else ""
            children = [
                (prefix + child, sub) for child, sub in module._modules.items() if sub is not None
            ]
            self._children[name] = children
        return children

    def is_layer(self, name: str, module: nn.Module) -> bool:
        return not self.children(name, module) or type(module).__name__ in self._no_split

    def can_split(self, name: str, obj: nn.Module | torch.Tensor) -> bool:
        return isinstance(obj, nn.Module) and not self.is_layer(name, obj)

    def split_parts(self, name: str, module: nn.Module) -> list[Entry]:
        """What a split module is replaced by: its direct parameters, then its children.

        A parameter registered under two names gets both (see `children`).
        """
        prefix = f"{name}." if name else ""
        parameters = [
            (prefix + parameter, tensor)
            for parameter, tensor in module.named_parameters(recurse=False, remove_duplicate=False)
        ]
        return parameters + self.children(name, module)

    def _compute_largest_layers(
        self, paths: list[tuple[str, nn.Module]], size_of: Callable[[str, Size], Size]
    ) -> None:
        """`largest_layers` of every module, children first (iterative: no deep recursion).

        A module with only empty layers gets ``(0, number of layers)``, as accelerate counts
        every layer of the maximum size, 0 included.
        """
        for name, module in reversed(paths):
            children = self._children.get(name)
            if not children or type(module).__name__ in self._no_split:
                self._largest_layers[name] = (size_of(name, 0), 1)
                continue
            size, count = self._largest_layers[children[0][0]]
            for child, _ in children[1:]:
                child_size, child_count = self._largest_layers[child]
                if child_size > size:
                    size, count = child_size, child_count
                elif child_size == size:
                    count += child_count
            self._largest_layers[name] = (size, count)

    def largest_layers(self, name: str) -> tuple[Size, int]:
        """``(size, count)``: the size of the largest layers under a module (computed by
        `from_scan`), and how many layers have that size."""
        return self._largest_layers[name]


# --------------------------------------------------------------------------------------------
# The waiting entries


class _QueueListener:
    """Told about every entry that enters or leaves the queue.

    ``part_of`` names the entry that a new entry was split from (None for a new entry).
    """

    def entered(self, name: str, obj: nn.Module | torch.Tensor, part_of: str | None) -> None: ...

    def left(self, name: str, obj: nn.Module | torch.Tensor) -> None: ...


class _Queue:
    """Entries in placement order: a doubly linked list indexed by name.

    Pop/push at the front, removal and in-place replacement of any entry are O(1) per entry
    (accelerate rebuilds or scans a Python list for each of these).
    """

    _END = None  # sentinel: _next[_END] is the first entry, _prev[_END] the last

    def __init__(self, entries: Iterable[Entry], listener: _QueueListener | None = None) -> None:
        self._objects: dict[str, nn.Module | torch.Tensor] = {}
        self._next: dict[str | None, str | None] = {self._END: self._END}
        self._prev: dict[str | None, str | None] = {self._END: self._END}
        self._listener = listener or _QueueListener()
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


class _LayerReserve(_QueueListener):
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

    def __init__(self, tree: _ModuleTree) -> None:
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


# --------------------------------------------------------------------------------------------
# Tied parameters


class _TiedGroups:
    """The tied groups that cross the boundary of an entry."""

    def __init__(self, groups: list[list[str]]) -> None:
        self._groups = groups

    def crossing(self, name: str) -> tuple[list[list[str]], list[str]]:
        """Groups with members both inside and outside ``name``, and the outside members.

        "Inside" is accelerate's test ``name + "." in member + "."``, a substring test: it
        also matches ``"1"`` inside ``"0.linear1.weight"``. It is kept to give the same maps.
        """
        key = f"{name}."
        groups: list[list[str]] = []
        outside: list[str] = []
        for group in self._groups:
            inside = [key in f"{member}." for member in group]
            if any(inside) and not all(inside):
                groups.append(group)
                outside.extend(
                    member for member, is_in in zip(group, inside, strict=True) if not is_in
                )
        return groups, outside


def _waiting_owner(tied_param: str, is_waiting: Callable[[str], bool]) -> str | None:
    """The waiting entry that holds ``tied_param``: a parent of it, or the tensor itself.

    None if the tensor's module was already placed (accelerate raises IndexError there).
    """
    parts = tied_param.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if is_waiting(parent):
            return parent
    return tied_param if is_waiting(tied_param) else None


def _size_with_ties(
    module_size: Size,
    tied_params: list[str],
    module_sizes: Mapping[str, Size],
    owner_of: Callable[[str], str | None],
) -> tuple[Size, list[str]]:
    """Size of an entry plus the modules holding its tied parameters (shared tensor once)."""
    size = module_size
    owners: list[str] = []
    for tied_param in tied_params:
        owner = owner_of(tied_param)
        if owner is not None:
            size += module_sizes.get(owner, 0) - module_sizes.get(tied_param, 0)
            owners.append(owner)
    return size, owners


def get_module_size_with_ties(
    tied_params: list[str],
    module_size: Size,
    module_sizes: Mapping[str, Size],
    modules_to_treat: list[Entry],
) -> tuple[Size, list[str], list[nn.Module | torch.Tensor]]:
    """Size of a module together with the waiting modules that hold its tied parameters.

    Args:
        tied_params: names of the parameters tied to the module but outside it.
        module_size: the module's own size.
        module_sizes: sizes from `compute_module_sizes`.
        modules_to_treat: the waiting entries; each tied parameter's holder is the first
            entry that contains it.

    Returns ``(size, holder names, holder objects)``; the shared tensors are counted once.
    A tied parameter held by no entry is ignored (accelerate raises IndexError).
    """
    first_position: dict[str, int] = {}
    for position, (name, _) in enumerate(modules_to_treat):
        first_position.setdefault(name, position)
    size, owners = _size_with_ties(
        module_size,
        tied_params,
        module_sizes,
        lambda tied: _first_listed_owner(tied, first_position),
    )
    return size, owners, [modules_to_treat[first_position[owner]][1] for owner in owners]


def _first_listed_owner(tied_param: str, first_position: dict[str, int]) -> str | None:
    parts = tied_param.split(".")
    parents = [".".join(parts[:depth]) for depth in range(1, len(parts))]
    listed = [parent for parent in parents if parent in first_position]
    if listed:
        return min(listed, key=first_position.__getitem__)
    return tied_param if tied_param in first_position else None


# --------------------------------------------------------------------------------------------
# Fallback allocation


def _find_fitting_entry(
    queue: _Queue,
    tree: _ModuleTree,
    size_limit: Size,
    ties: _TiedGroups,
) -> str | None:
    """accelerate's fallback search: the first entry (depth first, splitting modules that may
    be split) whose size with its tied modules fits ``size_limit``."""
    visited: set[str] = set()  # queue entries already searched
    expanded: list[Entry] = []  # stack of parts of searched modules, next one last
    expanded_names: set[str] = set()

    def still_searched(name: str) -> bool:
        return name in expanded_names or (name in queue and name not in visited)

    waiting = iter(queue)
    while True:
        if expanded:
            name, obj = expanded.pop()
            expanded_names.discard(name)
        else:
            name, obj = next(waiting, (None, None))
            if name is None:
                return None
            visited.add(name)
        _, tied_params = ties.crossing(name)
        owner_of = functools.partial(_waiting_owner, is_waiting=still_searched)
        size, _ = _size_with_ties(tree.size(name), tied_params, tree.sizes, owner_of)
        if size <= size_limit:
            return name
        if tree.can_split(name, obj):
            parts = tree.split_parts(name, obj)
            expanded.extend(reversed(parts))
            expanded_names.update(part for part, _ in parts)


def _split_parents_of(
    queue: _Queue, tree: _ModuleTree, name: str, on_split: Callable[[str, nn.Module], None]
) -> None:
    """Splits the waiting parents of ``name`` in place, so that ``name`` becomes an entry."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if parent in queue:
            parent_module = queue.get(parent)
            on_split(parent, parent_module)
            queue.replace(parent, tree.split_parts(parent, parent_module))


def fallback_allocate(
    modules: list[Entry],
    module_sizes: Mapping[str, Size],
    size_limit: int | float | str,
    no_split_module_classes: list[str] | None = None,
    tied_parameters: list[list[str]] | None = None,
) -> tuple[str | None, nn.Module | torch.Tensor | None, list[Entry]]:
    """Finds the first entry (searching inside splittable modules) that fits ``size_limit``.

    Returns ``(name, object, remaining entries)`` where the found entry's waiting parents
    have been replaced by their parts; ``(None, None, modules)`` if nothing fits. Unlike
    accelerate, a float ``size_limit`` is accepted.
    """
    limit = _size_limit(size_limit)
    if limit is None:
        return None, None, modules
    tree = _ModuleTree(module_sizes, no_split_module_classes or [])
    queue = _Queue(modules)
    found = _find_fitting_entry(queue, tree, limit, _TiedGroups(tied_parameters or []))
    if found is None:
        return None, None, modules
    _split_parents_of(queue, tree, found, lambda name, module: None)
    obj = queue.remove(found)
    return found, obj, list(queue)


def _size_limit(size_limit: int | float | str) -> Size | None:
    """The limit in bytes, or None when nothing can fit (negative or invalid limit)."""
    if isinstance(size_limit, str):
        try:
            return convert_file_size_to_int(size_limit)
        except ValueError:
            return None
    return None if size_limit < 0 else size_limit


# --------------------------------------------------------------------------------------------
# The planner


class _Planner:
    """One run of `infer_auto_device_map`: the queue, the devices, and what each holds.

    The decision steps (place, split a tied module, split, fallback, next device) are the
    methods `_treat` calls, in accelerate's order.
    """

    def __init__(
        self,
        model: nn.Module,
        max_memory: Mapping[DeviceKey, int | str] | None,
        no_split_module_classes: str | Iterable[str] | None,
        dtype: DtypeLike | None,
        special_dtypes: Mapping[str, DtypeLike] | None,
        offload_buffers: bool,
        fallback_allocation: bool,
        verbose: bool,
    ) -> None:
        self.max_memory = get_max_memory(max_memory)
        # "disk" is always the last tier, with unlimited room: planning never fails.
        self.devices: list[DeviceKey] = [
            *self.max_memory,
            *(["disk"] * ("disk" not in self.max_memory)),
        ]
        self.gpus = [device for device in self.devices if device not in ("cpu", "disk")]
        self.main_devices = _main_devices(self.gpus)
        self._dtype, self._special_dtypes = dtype, special_dtypes
        self._offload_buffers = offload_buffers
        self._fallback_allocation = fallback_allocation
        self._verbose = verbose

        scan = ModelScan(model, dtype, special_dtypes)
        self.tree = _ModuleTree.from_scan(scan, _class_names(no_split_module_classes))
        self._model_has_buffers = bool(scan.buffer_bytes)
        tied_parameters = tied_parameter_groups(scan)
        if check_tied_parameters_in_config(model) and not tied_parameters:
            logger.warning(
                "The model weights are not tied. Please use the `tie_weights` method before using "
                "the `infer_auto_device` function."
            )
        self.ties = _TiedGroups(tied_parameters)

        self.device_map: OrderedDict[str, DeviceKey] = OrderedDict()
        self.current = 0  # index in self.devices of the device being filled
        self.used: dict[DeviceKey, Size] = dict.fromkeys(self.devices, 0)
        self.offloaded_modules: dict[str, list[nn.Module]] = {device: [] for device in _OFFLOADED}
        self.minimum_needed: dict[DeviceKey, Size] = {}  # devices that got nothing
        # Split modules whose direct buffers are mapped with their first placed part.
        self._unmapped_buffers: dict[str, list[str]] = {}

        self.reserve = _LayerReserve(self.tree)
        top_level = self.tree.split_parts("", model) + list(model.named_buffers(recurse=False))
        self.queue = _Queue(top_level, listener=self.reserve)
        # accelerate's first reserve also counts the model's own tensors as layers.
        self.reserve.recompute(
            waiting_tensors=[entry for entry in top_level if isinstance(entry[1], torch.Tensor)]
        )

    def run(self) -> OrderedDict[str, DeviceKey]:
        while self.queue:
            name, obj = self.queue.pop_front()
            self._say(f"Treating module {name}.")
            self.reserve.popped(name, obj)
            self._treat(name, obj)
        return self.device_map

    def _say(self, message: str) -> None:
        if self._verbose:
            logger.info(message)

    def _treat(self, name: str, obj: nn.Module | torch.Tensor) -> None:
        module_size = self.tree.size(name)
        tied_groups, tied_params = self.ties.crossing(name)
        if tied_groups:
            self._say(f"  Found the relevant tied param groups {tied_groups}")
            self._say(f"  So those parameters need to be taken into account {tied_params}")
        device = self.devices[self.current]
        capacity = None if device == "disk" else self.max_memory[device]
        reserved = 0
        if device in self.main_devices:
            # Keep room to bring back the largest offloaded layer when it runs.
            reserved = self.reserve.size
            capacity -= reserved
        size, tied_names = _size_with_ties(
            module_size,
            tied_params,
            self.tree.sizes,
            functools.partial(_waiting_owner, is_waiting=self.queue.__contains__),
        )
        used = self.used[device]
        if capacity is None or used + size <= capacity:
            self._place(name, obj, device, size, tied_names, capacity)
            return
        if tied_params and used + module_size <= capacity:
            self._say(
                f"Not enough space on {device} to put {name} and {tied_names} (space available "
                f"{capacity - used}, needed size {size})."
            )
            if self._split_a_tied_module(name, obj, tied_names):
                return
            self._say("None of the tied module can be split, going to the next device.")
        if used + module_size >= capacity and self._split(name, obj, device, capacity):
            return
        may_fall_back = self._fallback_allocation and used == 0 and device != "disk"
        if may_fall_back and self._allocate_fallback(name, obj, device, size):
            return
        self._go_to_next_device(name, obj, device, size, reserved)

    def _place(
        self,
        name: str,
        obj: nn.Module | torch.Tensor,
        device: DeviceKey,
        size: Size,
        tied_names: list[str],
        capacity: Size | None,
    ) -> None:
        """Puts the entry and the modules holding its tied parameters on ``device``."""
        if self._verbose:
            what = f" and {tied_names}" if tied_names else f" (size={self.tree.size(name)})"
            room = "" if capacity is None else f" (available={capacity - self.used[device]})"
            self._say(f"Putting {name}{what}{room} on {device}.")
        self.used[device] += size
        self._map(name, device)
        for tied_name in tied_names:
            if tied_name in self.queue:
                self.queue.remove(tied_name)
            self._map(tied_name, device)
        if not self._offload_buffers and isinstance(obj, nn.Module) and device in _OFFLOADED:
            # Buffers of offloaded modules stay on the execution device: the warning at the
            # end needs their size (computed then, for these modules only).
            self.offloaded_modules[device].append(obj)

    def _map(self, name: str, device: DeviceKey) -> None:
        self.device_map[name] = device
        if not self._unmapped_buffers:
            return
        parts = name.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            for buffer_name in self._unmapped_buffers.pop(".".join(parts[:depth]), []):
                self.device_map[buffer_name] = device

    def _note_split(self, name: str, module: nn.Module) -> None:
        """Remembers the direct buffers of a module that is being split (see `_map`)."""
        buffers = [f"{name}.{buffer}" for buffer, _ in module.named_buffers(recurse=False)]
        if buffers:
            self._unmapped_buffers[name] = buffers

    def _split_a_tied_module(
        self, name: str, obj: nn.Module | torch.Tensor, tied_names: list[str]
    ) -> bool:
        """The entry fits alone but not with its tied modules: split the first splittable one."""
        for tied_name in tied_names:
            tied_module = self.queue.get(tied_name)
            if not self.tree.can_split(tied_name, tied_module):
                continue
            self._say(f"Splitting {tied_name}.")
            self._note_split(tied_name, tied_module)
            self.queue.replace(tied_name, self.tree.split_parts(tied_name, tied_module))
            self.queue.push_front([(name, obj)])
            self.reserve.recompute()
            return True
        return False

    def _split(
        self, name: str, obj: nn.Module | torch.Tensor, device: DeviceKey, capacity: Size
    ) -> bool:
        """The entry does not fit: replace it by its parameters and children, if it may be."""
        self._say(
            f"Not enough space on {device} to put {name} (space available "
            f"{capacity - self.used[device]}, module size {self.tree.size(name)})."
        )
        if not self.tree.can_split(name, obj):
            self._say("This module cannot be split, going to the next device.")
            return False
        self._say(f"Splitting {name}.")
        self._note_split(name, obj)
        self.queue.push_front(self.tree.split_parts(name, obj))
        self.reserve.recompute()
        return True

    def _allocate_fallback(
        self, name: str, obj: nn.Module | torch.Tensor, device: DeviceKey, size: Size
    ) -> bool:
        """Nothing fits on this empty device: look further down the queue for what does."""
        limit = _size_limit(self.max_memory[device] - max(self.reserve.size, size))
        found = (
            None if limit is None else _find_fitting_entry(self.queue, self.tree, limit, self.ties)
        )
        if found is None:
            return False
        _split_parents_of(self.queue, self.tree, found, self._note_split)
        self.queue.push_front([(name, obj)])
        self.queue.move_to_front(found)
        return True

    def _go_to_next_device(
        self,
        name: str,
        obj: nn.Module | torch.Tensor,
        device: DeviceKey,
        size: Size,
        reserved: Size,
    ) -> None:
        if self.used[device] == 0:
            self.minimum_needed[device] = size + reserved
        self.used[device] += reserved
        self.current += 1
        self.queue.push_front([(name, obj)])

    def warn_about_offloaded_buffers(self) -> None:
        """Warns when the buffers of CPU/disk modules fit on no GPU next to its weights."""
        if self._offload_buffers or not self.gpus or not self._model_has_buffers:
            return
        offloaded = sum(self._buffer_size(device) for device in _OFFLOADED)
        if offloaded <= 0:
            return
        fits_a_gpu = any(
            budget >= offloaded + self.used.get(device, 0)
            for device, budget in self.max_memory.items()
            if device not in ("cpu", "disk")
        )
        if not fits_a_gpu:
            warnings.warn(
                f"Current model requires {offloaded} bytes of buffer for offloaded layers, which "
                "seems does not fit any GPU's remaining memory. If you are experiencing a OOM "
                "later, please consider using offload_buffers=True.",
                UserWarning,
                stacklevel=3,
            )

    def _buffer_size(self, device: str) -> Size:
        total: Size = 0  # summed in placement order: sizes may be fractional
        for module in self.offloaded_modules[device]:
            # Module-relative names for special_dtypes, as accelerate does.
            total += compute_module_total_buffer_size(module, self._dtype, self._special_dtypes)
        return total

    def report_unused_devices(self) -> None:
        if not self.minimum_needed:
            return
        needs = "\n".join(
            f"  - {device}: {size} bytes required" for device, size in self.minimum_needed.items()
        )
        logger.info(
            "Based on the current allocation process, no modules could be assigned to the "
            f"following devices due to insufficient memory:\n{needs}\nThese minimum "
            "requirements are specific to this allocation attempt and may vary. Consider "
            "increasing the available memory for these devices to at least the specified "
            "minimum, or adjusting the model config."
        )


def _main_devices(gpus: list[DeviceKey]) -> list[DeviceKey]:
    """Devices that keep room for the largest offloaded layer (where offloaded layers run)."""
    if "mps" in gpus:
        return ["mps"]
    if gpus:
        return [gpus[0], "cpu"]
    return ["cpu"]


def _class_names(classes: str | Iterable[str] | None) -> list[str]:
    if classes is None:
        return []
    if isinstance(classes, str):
        return [classes]
    return list(classes)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while planning.

    Planning allocates a few small objects per module; with a large model in memory each
    automatic collection walks all its objects, and they would then take about half of the
    planning time on a 40k-module model. Planning creates no reference cycles to reclaim.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceKey, int | str] | None = None,
    no_split_module_classes: str | Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> OrderedDict[str, DeviceKey]:
    """Plans where each part of ``model`` goes: GPUs first, then CPU, then disk.

    Modules are taken in order and put on the current device while they fit; one that does
    not fit is split into its parameters and children (unless its class is in
    ``no_split_module_classes``), or the next device is used. The first GPU and the CPU keep
    room for the largest layer that remains, so that an offloaded layer can be brought back
    to run. Tied parameters are placed together. Works on meta models (sizes only).

    Args:
        model: the model to plan.
        max_memory: budget per device (``{0: "10GiB", "cpu": "30GB"}``); None measures the
            free memory. Without a ``"cpu"`` key nothing goes to the CPU; ``"disk"`` is
            always the unlimited last tier.
        no_split_module_classes: class names never split across devices (blocks with
            residual connections).
        dtype: dtype the weights will be loaded in (never makes a tensor bigger).
        special_dtypes: per-tensor dtypes, winning over ``dtype``.
        verbose: log each decision at INFO level on the ``bigmodel.device_map`` logger.
        clean_result: merge the entries of a module that all go to one device.
        offload_buffers: buffers of CPU/disk modules are offloaded too (no warning about them).
        fallback_allocation: when nothing fits on an empty device, look further down for a
            module that does instead of skipping the device.

    Returns an OrderedDict ``{module or tensor name: device}`` in placement order.
    """
    with _collector_paused():
        planner = _Planner(
            model,
            max_memory,
            no_split_module_classes,
            dtype,
            special_dtypes,
            offload_buffers,
            fallback_allocation,
            verbose,
        )
        device_map = planner.run()
        remember_planned_budget(model, planner.max_memory)
        if clean_result:
            device_map = clean_device_map(device_map)
    planner.warn_about_offloaded_buffers()
    planner.report_unused_devices()
    return device_map


# --------------------------------------------------------------------------------------------
# Checking and cleaning maps


def check_device_map(model: nn.Module, device_map: Mapping[str, DeviceMapValue]) -> None:
    """Checks that ``device_map`` gives a device to every tensor of ``model``'s state dict.

    Keys that name no submodule (other than ``""``) only raise a UserWarning. Non-persistent
    buffers need no device.

    Raises:
        ValueError: some state-dict tensors are covered by no key (they are listed).
    """
    module_names = {name for name, _ in model.named_modules()}
    unknown_keys = [key for key in device_map if key != "" and key not in module_names]
    if unknown_keys:
        warnings.warn(
            "The following device_map keys do not match any submodules in the model: "
            f"{unknown_keys}",
            UserWarning,
            stacklevel=2,
        )
    if "" in device_map:
        return
    uncovered = [name for name in model.state_dict() if not _covered(name, device_map)]
    if uncovered:
        raise ValueError(
            "The device_map provided does not give any device for the following parameters: "
            + ", ".join(uncovered)
        )


def _covered(name: str, device_map: Mapping[str, object]) -> bool:
    """True if ``name`` or one of its dotted parents is a key of ``device_map``."""
    if name in device_map:
        return True
    cut = name.find(".")
    while cut != -1:
        if name[:cut] in device_map:
            return True
        cut = name.find(".", cut + 1)
    return False


class _KeyNode:
    """A node of the prefix tree of device-map keys (one per dotted name prefix)."""

    __slots__ = ("children", "count", "first_value", "is_key", "uniform")

    def __init__(self) -> None:
        self.children: dict[str, _KeyNode] = {}  # next segment -> node, in order of first key
        self.is_key = False
        self.count = 0  # keys strictly below this node (for the root: all keys)
        self.first_value: object = None  # value of the first of those keys, in map order
        self.uniform = True  # whether all those keys have equal values

    def add_value_below(self, value: object) -> None:
        if self.count == 0:
            self.first_value = value
        elif self.uniform and len({self.first_value, value}) > 1:  # `set` equality, as upstream
            self.uniform = False
        self.count += 1


def _key_tree(device_map: Mapping[str, object]) -> _KeyNode:
    root = _KeyNode()
    for key, value in device_map.items():
        node = root
        root.add_value_below(value)  # the root covers "" itself too
        if key == "":
            root.is_key = True
            continue
        segments = key.split(".")
        for depth, segment in enumerate(segments):
            node = node.children.setdefault(segment, _KeyNode())
            if depth < len(segments) - 1:
                node.add_value_below(value)
        node.is_key = True
    return root


def clean_device_map(
    device_map: dict[str, DeviceMapValue], module_name: str = ""
) -> dict[str, DeviceMapValue]:
    """Merges the keys under a module that all have one device into the module's key.

    Modifies ``device_map`` in place and returns it. A merged key is appended at the end, as
    in accelerate: ``{"a.x": 0, "a.y": 0, "b": 1}`` becomes ``{"b": 1, "a": 0}``.
    Only keys under ``module_name`` are considered.
    """
    node = _key_tree(device_map)
    if module_name:
        for segment in module_name.split("."):
            node = node.children.get(segment)
            if node is None:
                return device_map
    _clean_below(device_map, node, module_name)
    return device_map


def _clean_below(device_map: dict[str, object], node: _KeyNode, name: str) -> None:
    if node.uniform and node.count > 1:
        for key in _keys_below(node, name):
            del device_map[key]
        device_map[name] = node.first_value
        return
    prefix = f"{name}." if name else ""
    # accelerate visits the children in the iteration order of a set of their names, built
    # name by name. Build it the same way (from a list: a set built from a dict is presized,
    # which changes its iteration order) to visit them in the same order.
    children = {f"{prefix}{segment}": child for segment, child in node.children.items()}
    for child_name in set(list(children)):
        _clean_below(device_map, children[child_name], child_name)


def _keys_below(node: _KeyNode, name: str) -> Iterator[str]:
    """The keys strictly below ``node`` (and the root's own ``""`` key)."""
    if name == "" and node.is_key:
        yield ""
    stack = [
        (f"{name}.{segment}" if name else segment, child)
        for segment, child in node.children.items()
    ]
    while stack:
        child_name, child = stack.pop()
        if child.is_key:
            yield child_name
        stack.extend(
            (f"{child_name}.{segment}", grandchild)
            for segment, grandchild in child.children.items()
        )
