"""Attaching `AlignDevicesHook`s to a model: per module, per block of a device map, or one
device for everything.

A hook goes on every module that owns tensors directly (or, for a class in
``preload_module_classes``, on that module for its whole subtree), reading its weights from
a `PrefixedDataset` view of the model's weights map under the module's dotted name.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    if not hasattr(module, "_hf_hook") and len(module.state_dict()) > 0:
        add_hook_to_module(
            module,
            AlignDevicesHook(
                execution_device, skip_keys=skip_keys, tied_params_map=tied_params_map
            ),
        )
    if preload_module_classes is not None and type(module).__name__ in preload_module_classes:
        return
    for child in module.children():
        attach_execution_device_hook(
            child, execution_device, skip_keys, preload_module_classes, tied_params_map
        )


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
    full_offload = (
        offload
        and preload_module_classes is not None
        and type(module).__name__ in preload_module_classes
    )
    has_direct_tensors = next(iter(named_module_tensors(module)), None) is not None
    if has_direct_tensors or full_offload:
        prefix = f"{module_name}." if module_name else ""
        hook = AlignDevicesHook(
            execution_device=execution_device,
            offload=offload,
            weights_map=None if weights_map is None else PrefixedDataset(weights_map, prefix),
            offload_buffers=offload_buffers,
            place_submodules=full_offload,
            skip_keys=skip_keys,
            tied_params_map=tied_params_map,
        )
        hook.module_name = module_name
        add_hook_to_module(module, hook, append=True)
    if full_offload:
        return  # the hook above loads the whole subtree at once
    for child_name, child in module.named_children():
        attach_align_device_hook(
            child,
            execution_device=execution_device,
            offload=offload,
            weights_map=weights_map,
            offload_buffers=offload_buffers,
            module_name=f"{module_name}.{child_name}" if module_name else child_name,
            skip_keys=skip_keys,
            preload_module_classes=preload_module_classes,
            tied_params_map=tied_params_map,
        )


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
    if not isinstance(execution_device, Mapping) and not isinstance(offload, dict):
        _attach_single_block(
            module,
            execution_device,
            offload,
            weights_map=weights_map,
            offload_buffers=offload_buffers,
            module_name=module_name,
            skip_keys=skip_keys,
            tied_params_map=tied_params_map,
        )
        return
    if not isinstance(execution_device, Mapping):
        execution_device = dict.fromkeys(offload, execution_device)
    if not isinstance(offload, Mapping):
        offload = dict.fromkeys(execution_device, offload)

    common = {"skip_keys": skip_keys, "tied_params_map": tied_params_map}
    if module_name in execution_device and module_name in offload:
        device = execution_device[module_name]
        if offload[module_name]:
            _attach_offloaded_block(
                module,
                device,
                weights_map=weights_map,
                offload_buffers=offload_buffers,
                module_name=module_name,
                preload_classes=preload_module_classes,
                common=common,
            )
        else:
            _attach_resident_block(module, device, offload_buffers, module_name, common)
    elif module_name == "":
        root_hook = AlignDevicesHook(execution_device.get(""), io_same_device=True, **common)
        add_hook_to_module(module, root_hook)

    for child_name, child in module.named_children():
        attach_align_device_hook_on_blocks(
            child,
            execution_device=execution_device,
            offload=offload,
            weights_map=weights_map,
            offload_buffers=offload_buffers,
            module_name=f"{module_name}.{child_name}" if module_name else child_name,
            skip_keys=skip_keys,
            preload_module_classes=preload_module_classes,
            tied_params_map=tied_params_map,
        )


def _attach_resident_block(module, device, offload_buffers, module_name, common) -> None:
    """A block that lives on ``device``: moved there now; each submodule moves its inputs."""
    hook = AlignDevicesHook(
        device,
        offload_buffers=offload_buffers,
        io_same_device=module_name == "",
        place_submodules=True,
        **common,
    )
    add_hook_to_module(module, hook)
    attach_execution_device_hook(module, device, **common)


def _attach_offloaded_block(
    module, device, weights_map, offload_buffers, module_name, preload_classes, common
) -> None:
    """A block whose weights are fetched from ``weights_map`` for each forward."""
    attach_align_device_hook(
        module,
        device,
        offload=True,
        weights_map=weights_map,
        offload_buffers=offload_buffers,
        module_name=module_name,
        preload_module_classes=preload_classes,
        **common,
    )
    if not hasattr(module, "_hf_hook"):  # no direct tensors: still move its inputs
        add_hook_to_module(
            module, AlignDevicesHook(device, io_same_device=module_name == "", **common)
        )
    attach_execution_device_hook(module, device, preload_module_classes=preload_classes, **common)


def _attach_single_block(module, execution_device, offload, **options) -> None:
    """The scalar form of `attach_align_device_hook_on_blocks`: one device for everything.

    ``options``: weights_map, offload_buffers, module_name, skip_keys, tied_params_map.
    """
    if offload:
        attach_align_device_hook(module, execution_device, offload=True, **options)
        return
    hook = AlignDevicesHook(
        execution_device=execution_device,
        io_same_device=True,
        skip_keys=options["skip_keys"],
        place_submodules=True,
        tied_params_map=options["tied_params_map"],
    )
    add_hook_to_module(module, hook)
