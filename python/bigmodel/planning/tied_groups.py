"""Tied parameters during placement: which groups cross an entry's boundary, and the size of
an entry together with the waiting modules that hold its tied parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from bigmodel.planning.module_sizes import Size
from bigmodel.planning.tree import Entry


class TiedGroups:
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


def waiting_owner(tied_param: str, is_waiting: Callable[[str], bool]) -> str | None:
    """The waiting entry that holds ``tied_param``: a parent of it, or the tensor itself.

    None if the tensor's module was already placed (accelerate raises IndexError there).
    """
    parts = tied_param.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if is_waiting(parent):
            return parent
    return tied_param if is_waiting(tied_param) else None


def size_with_ties(
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
    size, owners = size_with_ties(
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
