"""`AlignDevicesHook`: a module's inputs and weights on one execution device for its forward.

Without offload the hook moves the module's tensors to the execution device once (at
attach time) and its inputs at each forward. With offload it keeps the weights as ``meta``
placeholders between forwards and swaps them in for each forward from a weights map (a
`TensorStore`-backed `StoreWeightsMap` in bigmodel's own paths; see `bigmodel.hooks.swap`).

Differences from accelerate (see docs/compatibility.md): a failing forward (exception or
KeyboardInterrupt) drops the weights it loaded; a tensor that is already resident on the
execution device (a tie with a resident module) is used in place and stays tied; an
onloaded parameter that requires grad refuses to be trained; no ``empty_cache`` per tensor.
On a CUDA execution device the weights go through `bigmodel.transfer` (pinned staging
buffers, a side stream, a bounded window of modules' copies that the read-ahead fills), so
copies overlap the compute the host has already queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from bigmodel.hooks.protocol import ModelHook, _not_compiled
from bigmodel.hooks.swap import WeightSwap, install
from bigmodel.offload import unwrap_prefixes
from bigmodel.operations import find_device, send_to_device
from bigmodel.tensors import (
    get_tensor,
    named_module_tensors,
    offloaded_tensors,
    set_module_tensor_to_device,
)
from bigmodel.transfer import host_to_device


class Prefetcher(Protocol):
    """The seam for read-ahead. Set ``hook.prefetcher`` on offloading `AlignDevicesHook`s
    (see `iter_offload_hooks`); ``on_pre_forward`` then runs at the start of each of their
    forwards, before any weight is fetched, and ``on_post_forward`` (optional) at their end,
    once the weights are released. ``hook.source_map`` and ``hook.source_keys()`` say where the
    hook's weights come from, e.g. to call ``source_map.prefetch(keys)``."""

    def on_pre_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None: ...

    def on_post_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None: ...


class AlignDevicesHook(ModelHook):
    """Puts a module's inputs and weights on one execution device for its forward.

    Args:
        execution_device: where inputs and weights go for the forward (None: leave them).
        offload: keep the weights as ``meta`` placeholders between forwards and fetch them
            from ``weights_map`` for each forward.
        io_same_device: send the output back to the device of the first input tensor.
        weights_map: name -> tensor of the module's weights; built from the module's
            current tensors (CPU copies) when None.
        offload_buffers: offload the persistent buffers too (non-persistent ones stay
            resident on the execution device: no weights map can hold them).
        place_submodules: treat the whole subtree (dotted names) instead of direct tensors.
        skip_keys: mapping keys of inputs/outputs that are never moved.
        tied_params_map: data pointer -> {device: tensor}, shared by the hooks of a model,
            so a tied weight is materialised once per device.

    ``prefetcher`` (attribute, default None): a `Prefetcher` called by offloading forwards.
    """

    def __init__(
        self,
        execution_device: int | str | torch.device | None = None,
        offload: bool = False,
        io_same_device: bool = False,
        weights_map: Mapping | None = None,
        offload_buffers: bool = False,
        place_submodules: bool = False,
        skip_keys: str | list[str] | None = None,
        tied_params_map: dict[int, dict] | None = None,
    ):
        self.execution_device = execution_device
        self.offload = offload
        self.io_same_device = io_same_device
        self.weights_map = weights_map
        self.offload_buffers = offload_buffers
        self.place_submodules = place_submodules
        self.skip_keys = skip_keys
        self.tied_params_map = tied_params_map

        self.input_device = None  # set by pre_forward when io_same_device
        self.param_original_devices: dict = {}
        self.buffer_original_devices: dict = {}
        self.original_devices: dict[str, torch.device] = {}
        self.tied_params_names: set[str] = set()
        self.offloaded_names: list[str] = []  # tensors fetched from weights_map, set at init
        self.prefetcher: Prefetcher | None = None
        # Dotted name of the hooked module in its model, for error messages (set by
        # `attach_align_device_hook`; None for hooks attached by hand).
        self.module_name: str | None = None
        self._swap = WeightSwap()

    def __repr__(self):
        return (
            f"AlignDevicesHook(execution_device={self.execution_device}, offload={self.offload}, "
            f"io_same_device={self.io_same_device}, offload_buffers={self.offload_buffers}, "
            f"place_submodules={self.place_submodules}, skip_keys={self.skip_keys!r})"
        )

    @property
    def tied_pointers_to_remove(self) -> set:
        """The tied-map entries the innermost forward in progress will remove."""
        onloads = self._swap.onloads
        return onloads[-1].tied_pointers if onloads else set()

    # -- the prefetch seam ------------------------------------------------------------

    @property
    def source_map(self) -> Mapping | None:
        """The weights map this hook reads, with prefixed views removed."""
        return unwrap_prefixes(self.weights_map)[0]

    def source_keys(self) -> list[str]:
        """The keys of `source_map` that each forward of this hook fetches, in order."""
        prefix = unwrap_prefixes(self.weights_map)[1]
        return [prefix + name for name in self.offloaded_names]

    @property
    def copies_to_device(self) -> bool:
        """Whether forwards copy the offloaded weights to a CUDA device (`copy_ahead`)."""
        return self._swap.host_to_device is not None

    def copy_ahead(self, module: nn.Module) -> bool:
        """Starts copying ``module``'s offloaded weights to a CUDA execution device before
        its forward (the read-ahead calls this for the modules about to run). False when
        there is nothing to copy ahead, or the device already holds as many modules'
        weights as it may."""
        return self._swap.copy_ahead(self, module)

    # -- events -----------------------------------------------------------------------

    def init_hook(self, module):
        if self.execution_device == "meta" or self.execution_device == torch.device("meta"):
            self.tied_params_map = None  # every meta tensor has data pointer 0
        if self.offload:
            self._init_offload(module)
        elif self.execution_device is not None:
            for name, _ in named_module_tensors(module, recurse=self.place_submodules):
                self._move(module, name)
        return module

    def _init_offload(self, module: nn.Module) -> None:
        from bigmodel.wrapped import watch_offloaded_modules  # imports this module

        watch_offloaded_modules()  # adapters added around offloaded modules must not run
        self._swap.host_to_device = host_to_device(self.execution_device, user=self)
        self.original_devices = {
            name: tensor.device
            for name, tensor in named_module_tensors(module, recurse=self.place_submodules)
        }
        if self.weights_map is None:
            self.weights_map = {
                name: tensor.to("cpu")
                for name, tensor in named_module_tensors(
                    module, include_buffers=self.offload_buffers, recurse=self.place_submodules
                )
            }
        offloaded = offloaded_tensors(module, self.offload_buffers, recurse=self.place_submodules)
        self.offloaded_names = [name for name, _ in offloaded]
        for name in self.offloaded_names:
            # Values read from disk get a new data pointer at each read, so tied weights are
            # remembered by name and their pointer registered on the fly in pre_forward.
            if self.tied_params_map is not None and get_tensor(module, name).data_ptr() in (
                self.tied_params_map
            ):
                self.tied_params_names.add(name)
            set_module_tensor_to_device(module, name, "meta", clear_cache=False)
        if self.execution_device is None:
            return
        fetched = set(self.offloaded_names)
        for name, _ in module.named_buffers(recurse=self.place_submodules):
            if name not in fetched:
                self._move(module, name)

    def _move(self, module: nn.Module, name: str) -> None:
        set_module_tensor_to_device(
            module,
            name,
            self.execution_device,
            tied_params_map=self.tied_params_map,
            clear_cache=False,
        )

    @_not_compiled
    def pre_forward(self, module, *args, **kwargs):
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        if not self.offload:
            return self._send_inputs(args, kwargs)
        if self.prefetcher is not None:
            self.prefetcher.on_pre_forward(module, self)
        try:
            self._swap.load(self, module)
            return self._send_inputs(args, kwargs)
        except BaseException:
            self._swap.put_back(self, module)
            raise

    def _send_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = send_to_device(args, self.execution_device)
        if kwargs:
            kwargs = send_to_device(kwargs, self.execution_device, skip_keys=self.skip_keys)
        return args, kwargs

    @_not_compiled
    def post_forward(self, module, output):
        if self.offload:
            self._swap.put_back(self, module)
            released = getattr(self.prefetcher, "on_post_forward", None)
            if released is not None:
                released(module, self)
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def abort_forward(self, module):
        if self.offload:
            self._swap.put_back(self, module)

    def detach_hook(self, module):
        if not self.offload:
            return module
        for name, device in self.original_devices.items():
            if device == torch.device("meta"):
                continue
            if get_tensor(module, name).device.type != "meta":
                # Not offloaded (a buffer, or a tie with a resident module): move the live
                # tensor, so updates (running statistics) and ties survive.
                set_module_tensor_to_device(module, name, device, clear_cache=False)
                continue
            install(module, name, device, self.weights_map.get(name, None), self.weights_map)
        return module
