"""Attaching `AlignDevicesHook`s to a model: per module, per block of a device map, or one
device for everything.

A hook goes on every module that owns tensors directly (or, for a class in
``preload_module_classes``, on that module for its whole subtree), reading its weights from
a `PrefixedDataset` view of the model's weights map under the module's dotted name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from bigmodel.hooks.align import AlignDevicesHook
from bigmodel.hooks.protocol import add_hook_to_module
from bigmodel.offload import PrefixedDataset
from bigmodel.tensors import named_module_tensors


def attach_execution_device_hook(
    module: nn.Module,
    execution_device: int | str | torch.device,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: dict[int, dict] | None = None,
) -> None:
    """Gives every module with state (and no hook yet) a non-offloading `AlignDevicesHook`
    on ``execution_device``, so each moves its inputs there. Does not descend below modules
    whose class name is in ``preload_module_classes``."""
    for _, submodule in _walk(module, "", stop_at=preload_module_classes):
        if not hasattr(submodule, "_hf_hook") and len(submodule.state_dict()) > 0:
            hook = AlignDevicesHook(
                execution_device, skip_keys=skip_keys, tied_params_map=tied_params_map
            )
            add_hook_to_module(submodule, hook)


def attach_align_device_hook(
    module: nn.Module,
    execution_device: int | str | torch.device | None = None,
    offload: bool = False,
    weights_map: Mapping | None = None,
    offload_buffers: bool = False,
    module_name: str = "",
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: dict[int, dict] | None = None,
) -> None:
    """Appends an `AlignDevicesHook` to every module that owns tensors directly, reading
    ``weights_map`` under the module's dotted name. A module whose class name is in
    ``preload_module_classes`` (with ``offload``) gets one hook for its whole subtree."""
    whole_subtrees = preload_module_classes if offload else None
    for name, submodule in _walk(module, module_name, stop_at=whole_subtrees):
        whole_subtree = _is_one_of(submodule, whole_subtrees)
        if whole_subtree or next(iter(named_module_tensors(submodule)), None) is not None:
            prefix = f"{name}." if name else ""
            hook = AlignDevicesHook(
                execution_device=execution_device,
                offload=offload,
                weights_map=None if weights_map is None else PrefixedDataset(weights_map, prefix),
                offload_buffers=offload_buffers,
                place_submodules=whole_subtree,
                skip_keys=skip_keys,
                tied_params_map=tied_params_map,
            )
            hook.module_name = name
            add_hook_to_module(submodule, hook, append=True)


def attach_align_device_hook_on_blocks(
    module: nn.Module,
    execution_device: int | str | torch.device | Mapping | None = None,
    offload: bool | Mapping[str, bool] = False,
    weights_map: Mapping | None = None,
    offload_buffers: bool = False,
    module_name: str = "",
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    tied_params_map: dict[int, dict] | None = None,
) -> None:
    """Attaches hooks block by block, from per-block execution devices and offload flags
    (dicts keyed by module name, or one value for all). The root always gets a hook that
    moves inputs to its execution device and outputs back to the caller's device."""
    common = {"skip_keys": skip_keys, "tied_params_map": tied_params_map}
    if not isinstance(execution_device, Mapping) and not isinstance(offload, dict):
        if offload:
            attach_align_device_hook(
                module,
                execution_device,
                offload=True,
                weights_map=weights_map,
                offload_buffers=offload_buffers,
                module_name=module_name,
                **common,
            )
        else:
            hook = AlignDevicesHook(
                execution_device, io_same_device=True, place_submodules=True, **common
            )
            add_hook_to_module(module, hook)
        return
    if not isinstance(execution_device, Mapping):
        execution_device = dict.fromkeys(offload, execution_device)
    if not isinstance(offload, Mapping):
        offload = dict.fromkeys(execution_device, offload)
    for name, block in _walk(module, module_name):
        if name in execution_device and name in offload:
            device = execution_device[name]
            if offload[name]:
                _attach_offloaded_block(
                    block,
                    name,
                    device,
                    weights_map,
                    offload_buffers,
                    preload_module_classes,
                    common,
                )
            else:
                _attach_resident_block(block, name, device, offload_buffers, common)
        elif name == "":
            root_hook = AlignDevicesHook(execution_device.get(""), io_same_device=True, **common)
            add_hook_to_module(block, root_hook)


def _walk(
    module: nn.Module, module_name: str, stop_at: list[str] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, module)`` for ``module`` and its descendants, parents first (the
    order of a recursion over ``named_children``), not below modules whose class name is in
    ``stop_at``. Children are listed after their parent was handled: hooks added to the
    parent may be seen by them."""
    stack = [(module_name, module)]
    while stack:
        name, current = stack.pop()
        yield name, current
        if _is_one_of(current, stop_at):
            continue
        prefix = f"{name}." if name else ""
        children = [(prefix + child_name, child) for child_name, child in current.named_children()]
        stack.extend(reversed(children))


def _is_one_of(module: nn.Module, class_names: list[str] | None) -> bool:
    return class_names is not None and type(module).__name__ in class_names


def _attach_resident_block(block, name, device, offload_buffers, common) -> None:
    """A block that lives on ``device``: moved there now; each submodule moves its inputs."""
    hook = AlignDevicesHook(
        device,
        offload_buffers=offload_buffers,
        io_same_device=name == "",
        place_submodules=True,
        **common,
    )
    add_hook_to_module(block, hook)
    attach_execution_device_hook(block, device, **common)


def _attach_offloaded_block(
    block, name, device, weights_map, offload_buffers, preload_classes, common
) -> None:
    """A block whose weights are fetched from ``weights_map`` for each forward."""
    attach_align_device_hook(
        block,
        device,
        offload=True,
        weights_map=weights_map,
        offload_buffers=offload_buffers,
        module_name=name,
        preload_module_classes=preload_classes,
        **common,
    )
    if not hasattr(block, "_hf_hook"):  # no direct tensors: still move its inputs
        add_hook_to_module(block, AlignDevicesHook(device, io_same_device=name == "", **common))
    attach_execution_device_hook(block, device, preload_module_classes=preload_classes, **common)
