"""Checking and cleaning device maps: `check_device_map`, `clean_device_map`.

Both use a prefix tree of the map's keys or prefix lookups instead of rescanning every key
for every key, as accelerate does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

DeviceMapValue = int | str | torch.device


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
    uncovered = [name for name in model.state_dict() if covering_key(name, device_map) is None]
    if uncovered:
        raise ValueError(
            "The device_map provided does not give any device for the following parameters: "
            + ", ".join(uncovered)
        )


def covering_key(name: str, device_map: Mapping[str, object]) -> str | None:
    """The longest key of ``device_map`` that is ``name`` or one of its dotted parents (the
    key ``""`` covers every name), whose device ``name`` goes to; None when no key does."""
    key = name
    while key not in device_map:
        if not key:
            return None
        key = key.rpartition(".")[0]
    return key


def device_of(name: str, device_map: Mapping[str, object]) -> object | None:
    """The device ``device_map`` gives ``name`` (see `covering_key`); None when none does."""
    key = covering_key(name, device_map)
    return None if key is None else device_map[key]


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
