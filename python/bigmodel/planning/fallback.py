"""Fallback allocation: when nothing fits on an empty device, the first entry further down
the queue (searching inside modules that may be split) that does."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from bigmodel.planning.module_sizes import Size
from bigmodel.planning.queue import Queue
from bigmodel.planning.tied_groups import TiedGroups, size_with_ties, waiting_owner
from bigmodel.planning.tree import Entry, ModuleTree
from bigmodel.sizes import convert_file_size_to_int


def find_fitting_entry(
    queue: Queue,
    tree: ModuleTree,
    size_limit: Size,
    ties: TiedGroups,
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
        owner_of = functools.partial(waiting_owner, is_waiting=still_searched)
        size, _ = size_with_ties(tree.size(name), tied_params, tree.sizes, owner_of)
        if size <= size_limit:
            return name
        if tree.can_split(name, obj):
            parts = tree.split_parts(name, obj)
            expanded.extend(reversed(parts))
            expanded_names.update(part for part, _ in parts)


def split_parents_of(
    queue: Queue, tree: ModuleTree, name: str, on_split: Callable[[str, nn.Module], None]
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
    limit = limit_in_bytes(size_limit)
    if limit is None:
        return None, None, modules
    tree = ModuleTree(module_sizes, no_split_module_classes or [])
    queue = Queue(modules)
    found = find_fitting_entry(queue, tree, limit, TiedGroups(tied_parameters or []))
    if found is None:
        return None, None, modules
    split_parents_of(queue, tree, found, lambda name, module: None)
    obj = queue.remove(found)
    return found, obj, list(queue)


def limit_in_bytes(size_limit: int | float | str) -> Size | None:
    """The limit in bytes, or None when nothing can fit (negative or invalid limit)."""
    if isinstance(size_limit, str):
        try:
            return convert_file_size_to_int(size_limit)
        except ValueError:
            return None
    return None if size_limit < 0 else size_limit
