"""Moving nested inputs and outputs between devices: `send_to_device`, `find_device`.

The hooks run every module's arguments and results through these, so they accept whatever a
forward takes or returns: tensors, objects with a ``.to`` method (a tokenizer's
``BatchEncoding``), lists, tuples, named tuples and mappings nested in any way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def send_to_device(
    tensor: Any,
    device: torch.device | str | int | None,
    non_blocking: bool = False,
    skip_keys: str | list[str] | None = None,
) -> Any:
    """Returns ``tensor`` (a tensor or any nesting of them) moved to ``device``.

    Args:
        tensor: a tensor, an object with a ``.to`` method, or lists/tuples/mappings of them
            (named ``tensor`` as in accelerate). Anything else is returned unchanged.
        device: the target device; None leaves tensors where they are.
        non_blocking: passed to ``.to`` (dropped for objects whose ``.to`` does not take it).
        skip_keys: mapping keys (at any depth) whose values are left untouched.

    Lists and tuples keep their type (named tuples included); mappings are rebuilt with
    ``type(mapping)(...)``.
    """
    target = _as_torch_device(device)
    if isinstance(tensor, torch.Tensor) and tensor.device == target:
        return tensor  # the hooks' common case, without parsing `.to`'s arguments
    if isinstance(tensor, torch.Tensor) or hasattr(tensor, "to"):
        try:
            return tensor.to(device, non_blocking=non_blocking)
        except TypeError:  # a `.to` that does not accept `non_blocking`
            return tensor.to(device)
    if isinstance(tensor, tuple | list):
        if isinstance(tensor, tuple) and _all_tensors_on(tensor, target):
            return tensor  # a module's positional inputs, usually: nothing to rebuild
        moved = (send_to_device(item, device, non_blocking, skip_keys) for item in tensor)
        return _same_sequence_type(tensor, moved)
    if isinstance(tensor, Mapping):
        skipped = [skip_keys] if isinstance(skip_keys, str) else (skip_keys or [])
        return type(tensor)(
            {
                key: value
                if key in skipped
                else send_to_device(value, device, non_blocking, skipped)
                for key, value in tensor.items()
            }
        )
    return tensor


def _as_torch_device(device) -> torch.device | None:
    """``device`` as a ``torch.device``, to compare with a tensor's (None when torch does not
    read it as a device). ``.to`` still gets ``device`` as the caller gave it."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str | int) and not isinstance(device, bool):
        try:
            return torch.device(device)
        except RuntimeError:  # a name torch does not know
            return None
    return None


def _all_tensors_on(items: list | tuple, device: torch.device | None) -> bool:
    return all(isinstance(item, torch.Tensor) and item.device == device for item in items)


def _same_sequence_type(original: list | tuple, items) -> list | tuple:
    # A named tuple's constructor takes its fields as separate arguments.
    if isinstance(original, tuple) and hasattr(original, "_fields"):
        return type(original)(*items)
    return type(original)(items)


def find_device(data: Any) -> torch.device | None:
    """The device of the first tensor found depth-first in ``data`` (mappings by value), or None."""
    if isinstance(data, torch.Tensor):
        return data.device
    if isinstance(data, Mapping):
        data = data.values()
    elif not isinstance(data, tuple | list):
        return None
    for item in data:
        device = find_device(item)
        if device is not None:
            return device
    return None
