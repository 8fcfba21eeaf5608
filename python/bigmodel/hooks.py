"""The hook protocol and the hooks that place and offload weights around a module's forward.

`add_hook_to_module` replaces ``module.forward`` by a ``functools.partial`` that runs
``hook.pre_forward`` → the original forward → ``hook.post_forward``. The attribute names
(``_hf_hook``, ``_old_forward``) and the partial (deepcopy-safe, ``__wrapped__``, signature
preserved) are the ones accelerate uses: transformers and PEFT read them.

`AlignDevicesHook` is the workhorse: it moves inputs to an execution device and, when
offloading, keeps the module's weights as ``meta`` placeholders between forwards, fetching
them from a weights map (a `TensorStore`-backed `StoreWeightsMap` in bigmodel's own paths)
just before the forward and dropping them right after.

Differences from accelerate (see docs/compatibility.md): a failing forward (exception or
KeyboardInterrupt) drops the weights it loaded; a tensor that is already resident on the
execution device (a tie with a resident module) is used in place and stays tied; an
onloaded parameter that requires grad refuses to be trained; `has_offloaded_params` sees
through a `SequentialHook`; no ``empty_cache`` per tensor. On a CUDA execution device the
weights go through `bigmodel.transfer` (pinned staging buffers, a side stream), so copies
overlap the compute the host has already queued.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bigmodel.offload import PrefixedDataset
from bigmodel.operations import find_device, send_to_device
from bigmodel.tensors import (
    check_device_same,
    get_non_persistent_buffers,
    named_module_tensors,
    set_module_tensor_to_device,
)
from bigmodel.transfer import HostToDevice, host_to_device

logger = logging.getLogger(__name__)

# Instance attributes `dispatch_model` sets to guard moves; removing hooks restores the class's.
_DISPATCH_ATTRIBUTES = ("to", "cuda", "npu", "xpu", "mlu", "sdaa", "musa")

# Layers `attach_layerwise_casting_hooks` casts (their weights feed one matmul/conv).
SUPPORTED_PYTORCH_LAYERS_FOR_UPCASTING = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def _not_compiled(method):
    """`torch.compiler.disable` while dynamo traces (tracing a hook's device bookkeeping would
    only cause graph breaks), built on first need: importing dynamo at import time costs
    seconds. Eager calls go straight to ``method``: the hooks run hundreds of times a
    forward, and the disable wrapper's frame switching would be paid on each."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return method(*args, **kwargs)
        compiled = getattr(wrapper, "_disabled", None)
        if compiled is None:
            compiled = wrapper._disabled = torch.compiler.disable(method)
        return compiled(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------


class ModelHook:
    """Callbacks run around a module's forward; unlike torch hooks they see and may rewrite
    the keyword arguments.

    ``no_grad`` (class attribute, default False): run the forward under ``torch.no_grad()``.
    ``forward_lock`` (default None): a lock held around the hooked forward (see
    `share_forward_lock`).
    """

    no_grad = False
    forward_lock: ForwardLock | None = None

    def init_hook(self, module: nn.Module) -> nn.Module:
        """Runs when the hook is attached; returns the module."""
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        """Runs before the forward; returns the (possibly rewritten) ``args, kwargs``."""
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        """Runs after the forward; returns the (possibly rewritten) output."""
        return output

    def abort_forward(self, module: nn.Module) -> None:
        """bigmodel extension: runs instead of `post_forward` when the forward raised (or a
        later hook of a `SequentialHook` failed in ``pre_forward``), to undo what
        `pre_forward` did. The exception is re-raised afterwards."""

    def detach_hook(self, module: nn.Module) -> nn.Module:
        """Runs when the hook is removed; returns the module."""
        return module


class SequentialHook(ModelHook):
    """Several hooks run as one, each event in insertion order (post_forward too)."""

    def __init__(self, *hooks: ModelHook):
        self.hooks = hooks

    def init_hook(self, module):
        for hook in self.hooks:
            module = hook.init_hook(module)
        return module

    @_not_compiled
    def pre_forward(self, module, *args, **kwargs):
        for position, hook in enumerate(self.hooks):
            try:
                args, kwargs = hook.pre_forward(module, *args, **kwargs)
            except BaseException:
                _abort_hooks(self.hooks[:position], module)
                raise
        return args, kwargs

    @_not_compiled
    def post_forward(self, module, output):
        for hook in self.hooks:
            output = hook.post_forward(module, output)
        return output

    def abort_forward(self, module):
        _abort_hooks(self.hooks, module)

    def detach_hook(self, module):
        for hook in self.hooks:
            module = hook.detach_hook(module)
        return module


def _abort_hooks(hooks, module: nn.Module) -> None:
    # Undo in reverse order, like unwinding nested contexts. Hooks written for accelerate
    # have no `abort_forward`; there is nothing we could undo for them.
    for hook in reversed(hooks):
        abort = getattr(hook, "abort_forward", None)
        if abort is not None:
            abort(module)


def add_hook_to_module(module: nn.Module, hook: ModelHook, append: bool = False) -> nn.Module:
    """Attaches ``hook`` to ``module`` by rewriting its ``forward`` (in place; returns it).

    An existing hook is replaced (without its ``detach_hook``), unless ``append`` is True:
    then the old hook is detached and chained with the new one in a `SequentialHook`, whose
    ``init_hook`` runs both again.
    """
    if append and getattr(module, "_hf_hook", None) is not None:
        old_hook = module._hf_hook
        remove_hook_from_module(module)
        hook = SequentialHook(old_hook, hook)

    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        original_forward = module._old_forward
    else:
        original_forward = module.forward
        module._old_forward = original_forward

    module = hook.init_hook(module)
    module._hf_hook = hook
    # A partial bound to the module (not a closure) so that copy.deepcopy rebinds it to the copy.
    forward = functools.update_wrapper(functools.partial(_hooked_forward, module), original_forward)
    if _is_fx_graph_module(module):
        # An instance-level forward would freeze a GraphModule's graph.
        type(module).forward = forward
    else:
        module.forward = forward
    return module


def _is_fx_graph_module(module: nn.Module) -> bool:
    return "GraphModuleImpl" in str(type(module))


def _hooked_forward(module: nn.Module, *args, **kwargs):
    lock = getattr(module._hf_hook, "forward_lock", None)
    if lock is None:
        return _run_hooked(module, args, kwargs)
    with lock:
        return _run_hooked(module, args, kwargs)


def _run_hooked(module: nn.Module, args: tuple, kwargs: dict):
    hook = module._hf_hook
    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    try:
        if hook.no_grad:
            with torch.no_grad():
                output = module._old_forward(*args, **kwargs)
        else:
            output = module._old_forward(*args, **kwargs)
    except BaseException:  # KeyboardInterrupt too: loaded weights must not stay pinned
        _abort_hooks((hook,), module)
        raise
    return hook.post_forward(module, output)


class ForwardLock:
    """The reentrant lock of `share_forward_lock`. A deep copy of a model gets a lock of its
    own (one for all its hooks: `copy.deepcopy` keeps shared objects shared)."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> ForwardLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> ForwardLock:
        return ForwardLock()


def share_forward_lock(model: nn.Module) -> None:
    """Makes the forwards of ``model``'s hooked modules take one shared, reentrant lock.

    An offloading hook swaps weights into the module for its forward and out again after,
    and the model's hooks share read-ahead and tied-weight state: two threads running the
    same dispatched model at once would swap weights out from under each other. With the
    lock, a second thread waits until the first one's outermost hooked forward returns
    (for a dispatched model, the whole call), then runs; forwards stay exact. A model
    without offloaded weights is left alone: its hooks swap nothing."""
    if next(iter_offload_hooks(model), None) is None:
        return
    lock = ForwardLock()
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            hook.forward_lock = lock


def remove_hook_from_module(module: nn.Module, recurse: bool = False) -> nn.Module:
    """Detaches the hook of ``module`` (running its ``detach_hook``), restores the original
    forward and the class's ``to``/``cuda``; with ``recurse``, does the same for every
    descendant."""
    if hasattr(module, "_hf_hook"):
        module._hf_hook.detach_hook(module)
        delattr(module, "_hf_hook")
    if hasattr(module, "_old_forward"):
        _restore_forward(module, module._old_forward)
        delattr(module, "_old_forward")
    for attribute in _DISPATCH_ATTRIBUTES:
        module.__dict__.pop(attribute, None)
    if recurse:
        for child in module.children():
            remove_hook_from_module(child, recurse)
    return module


def _restore_forward(module: nn.Module, original_forward) -> None:
    if _is_fx_graph_module(module):
        type(module).forward = original_forward
    elif getattr(original_forward, "__self__", None) is module and getattr(
        original_forward, "__func__", None
    ) is getattr(type(module), "forward", None):
        # The class's own forward: drop the instance attribute, leaving the module as it was.
        module.__dict__.pop("forward", None)
    else:
        module.forward = original_forward


def remove_hook_from_submodules(module: nn.Module) -> None:
    """Removes the hooks of ``module`` and of all its descendants (parents first)."""
    remove_hook_from_module(module)
    for child in module.children():
        remove_hook_from_submodules(child)


# --------------------------------------------------------------------------------------
# AlignDevicesHook
# --------------------------------------------------------------------------------------


class Prefetcher(Protocol):
    """The seam for read-ahead. Set ``hook.prefetcher`` on offloading `AlignDevicesHook`s
    (see `iter_offload_hooks`); ``on_pre_forward`` then runs at the start of each of their
    forwards, before any weight is fetched. ``hook.source_map`` and ``hook.source_keys()``
    say where the hook's weights come from, e.g. to call ``source_map.prefetch(keys)``."""

    def on_pre_forward(self, module: nn.Module, hook: AlignDevicesHook) -> None: ...


@dataclass(frozen=True)
class _Fetch:
    """One offloaded tensor, resolved once: where it lives in the module, and how to read
    its value (a closure that goes straight to the store when the weights map allows)."""

    name: str
    owner: nn.Module
    leaf: str
    read: Callable[[], torch.Tensor]


@dataclass
class _Onload:
    """What one offloading pre_forward changed, so post_forward (or an abort) can undo it."""

    # name -> (its fetch, the tensor the module held before: its meta placeholder, usually)
    replaced: dict[str, tuple[_Fetch, torch.Tensor]] = field(default_factory=dict)
    # (data pointer, device) entries this forward added to the tied-parameters map
    tied_pointers: set = field(default_factory=set)


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
        # One entry per forward in progress (a module may run inside its own forward).
        self._onloads: list[_Onload] = []
        # `offloaded_names` resolved against `weights_map` (see `_fetches`), and the map
        # they were resolved against.
        self._fetch_plan: list[_Fetch] = []
        self._fetch_plan_source: Mapping | None = None
        # Copies offloaded weights to a CUDA execution device (set by init_hook; None else).
        self._host_to_device: HostToDevice | None = None

    def __repr__(self):
        return (
            f"AlignDevicesHook(execution_device={self.execution_device}, offload={self.offload}, "
            f"io_same_device={self.io_same_device}, offload_buffers={self.offload_buffers}, "
            f"place_submodules={self.place_submodules}, skip_keys={self.skip_keys!r})"
        )

    def __deepcopy__(self, memo: dict) -> AlignDevicesHook:
        # The fetch plan's readers close over the original weights map: a copy (of a deep-
        # copied model) resolves its own against its copied map on its first forward.
        copied = copy.copy(self)
        memo[id(self)] = copied
        for attribute, value in self.__dict__.items():
            setattr(copied, attribute, copy.deepcopy(value, memo))
        copied._fetch_plan, copied._fetch_plan_source = [], None
        return copied

    @property
    def tied_pointers_to_remove(self) -> set:
        """The tied-map entries the innermost forward in progress will remove."""
        return self._onloads[-1].tied_pointers if self._onloads else set()

    # -- the prefetch seam ------------------------------------------------------------

    @property
    def source_map(self) -> Mapping | None:
        """The weights map this hook reads, with `PrefixedDataset` layers removed."""
        return _strip_prefixes(self.weights_map)[0]

    def source_keys(self) -> list[str]:
        """The keys of `source_map` that each forward of this hook fetches, in order."""
        prefix = _strip_prefixes(self.weights_map)[1]
        return [prefix + name for name in self.offloaded_names]

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
        self._host_to_device = host_to_device(self.execution_device)
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
        self.offloaded_names = [
            name
            for name, _ in named_module_tensors(
                module,
                include_buffers=self.offload_buffers,
                recurse=self.place_submodules,
                remove_non_persistent=True,
            )
        ]
        for name in self.offloaded_names:
            # Values read from disk get a new data pointer at each read, so tied weights are
            # remembered by name and their pointer registered on the fly in pre_forward.
            if self.tied_params_map is not None and _tensor(module, name).data_ptr() in (
                self.tied_params_map
            ):
                self.tied_params_names.add(name)
            set_module_tensor_to_device(module, name, "meta", clear_cache=False)
        if self.execution_device is None:
            return
        if self.offload_buffers:
            resident_buffers = get_non_persistent_buffers(module, recurse=self.place_submodules)
        else:
            resident_buffers = [
                name for name, _ in module.named_buffers(recurse=self.place_submodules)
            ]
        for name in resident_buffers:
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
        self._onloads.append(_Onload())
        try:
            for fetch in self._fetches(module):
                self._onload(module, fetch)
            return self._send_inputs(args, kwargs)
        except BaseException:
            self._offload(module)
            raise

    def _send_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = send_to_device(args, self.execution_device)
        if kwargs:
            kwargs = send_to_device(kwargs, self.execution_device, skip_keys=self.skip_keys)
        return args, kwargs

    def _fetches(self, module: nn.Module) -> list[_Fetch]:
        """`offloaded_names` resolved to owners and readers, once per weights map (a
        forward then does no name lookups; replacing ``weights_map`` resolves again)."""
        if self._fetch_plan_source is not self.weights_map:
            source, prefix = _strip_prefixes(self.weights_map)
            reader = getattr(source, "reader", None)
            self._fetch_plan = []
            for name in self.offloaded_names:
                owner, leaf = _owner(module, name)
                if reader is None:
                    read = functools.partial(self.weights_map.__getitem__, name)
                elif leaf in owner._buffers:
                    # A module may write its buffers (batch-norm statistics): it gets a
                    # private copy, as from accelerate's disk offload, never the bytes the
                    # store shares with other holders.
                    read = _private_copies(reader(prefix + name))
                else:
                    read = reader(prefix + name)
                self._fetch_plan.append(_Fetch(name, owner, leaf, read))
            self._fetch_plan_source = self.weights_map
        return self._fetch_plan

    def _onload(self, module: nn.Module, fetch: _Fetch) -> None:
        """Fetches one weight from the weights map onto the execution device."""
        name, owner, leaf = fetch.name, fetch.owner, fetch.leaf
        current = getattr(owner, leaf)
        if _is_on(current, self.execution_device):
            # Already resident (a tie with a resident module, or an enclosing forward of
            # this module loaded it): use it in place, which keeps the tie intact.
            return
        onload = self._onloads[-1]
        onload.replaced[name] = (fetch, current)
        value = fetch.read()
        if self._host_to_device is not None and not self._is_tied(name, value):
            # Queued on a side stream through pinned buffers; this stream waits on the GPU.
            value = self._host_to_device.copy(value)
        if self._swap_in_place(owner, leaf, name, current, value):
            self._refuse_training(module, name)
            return
        pointer = value.data_ptr()
        reused = False
        if self.tied_params_map is not None:
            if name in self.tied_params_names and pointer not in self.tied_params_map:
                self.tied_params_map[pointer] = {}
            copies = self.tied_params_map.get(pointer)
            if copies is not None:
                reused = self.execution_device in copies
                if not reused:
                    onload.tied_pointers.add((pointer, self.execution_device))
        set_module_tensor_to_device(
            module,
            name,
            self.execution_device,
            value=value,
            fp16_statistics=self._maybe_get_fp16_statistics(name, value),
            tied_params_map=self.tied_params_map,
            clear_cache=False,
        )
        if not reused:  # a reused copy belongs to whoever created it
            self._refuse_training(module, name)

    def _is_tied(self, name: str, value: torch.Tensor) -> bool:
        """Whether the tied-parameters map tracks ``name`` (it is keyed by host pointers)."""
        if name in self.tied_params_names:
            return True
        return bool(self.tied_params_map) and value.data_ptr() in self.tied_params_map

    def _swap_in_place(self, owner: nn.Module, leaf: str, name: str, current, value) -> bool:
        """Installs ``value`` as ``owner.<leaf>`` in the common case, without the general
        machinery of `set_module_tensor_to_device` (this runs for every weight of every
        forward): a plain parameter whose fetched value already has its device, dtype and
        shape, and is not tied. Returns False, changing nothing, in any other case."""
        if (
            type(current) is not nn.Parameter
            or value.dtype != current.dtype
            or value.shape != current.shape
            or not _is_on(value, self.execution_device)
            or self._is_tied(name, value)
        ):
            return False
        parameter = nn.Parameter(value, requires_grad=current.requires_grad)
        if hasattr(current, "_is_hf_initialized"):  # transformers' loaded-weight flag
            parameter._is_hf_initialized = current._is_hf_initialized
        owner._parameters[leaf] = parameter
        return True

    def _maybe_get_fp16_statistics(self, name: str, value: torch.Tensor | None):
        # bitsandbytes int8 weights keep their scales in a separate "SCB" entry.
        if value is None or value.dtype != torch.int8 or "weight" not in name:
            return None
        statistics_name = name.replace("weight", "SCB")
        if statistics_name in self.weights_map:
            return self.weights_map[statistics_name]
        return None

    def _refuse_training(self, module: nn.Module, name: str) -> None:
        """Makes backward fail loudly on an onloaded parameter: it is a copy that is dropped
        after the forward, so an optimizer step could never update the offloaded weight."""
        if not torch.is_grad_enabled():  # first: inference pays nothing more
            return
        parameter = _tensor(module, name)
        if not parameter.requires_grad:
            return
        if self.module_name:
            full_name = f"{self.module_name}.{name}"
        else:
            full_name = _strip_prefixes(self.weights_map)[1] + name
        message = (
            f"cannot compute the gradient of parameter '{full_name}' (in "
            f"{type(module).__name__}): its module is offloaded, so the parameter is a "
            "temporary copy loaded for one forward and an optimizer could never update it. "
            "Offloaded weights cannot be trained: keep trainable modules on their execution "
            "device, or call requires_grad_(False) on offloaded modules (inputs can still get "
            "gradients). For inference, run the model under torch.no_grad()."
        )
        parameter.register_hook(functools.partial(_refuse_gradient, message))

    @_not_compiled
    def post_forward(self, module, output):
        if self.offload:
            self._offload(module)
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def abort_forward(self, module):
        if self.offload:
            self._offload(module)

    def _offload(self, module: nn.Module) -> None:
        """Puts back what the innermost pre_forward replaced; the fetched values (and the
        store bytes they pin) are released with them. The record leaves the stack only once
        everything is back, and a KeyboardInterrupt landing mid-way finishes the restore
        before it propagates, so no weight stays loaded (and pinned)."""
        if not self._onloads:
            return
        onload = self._onloads[-1]
        try:
            self._restore(module, onload)
        except BaseException:
            self._restore(module, onload)  # finish what the interrupt cut short
            raise
        finally:
            if not onload.replaced:
                self._onloads.pop()

    def _restore(self, module: nn.Module, onload: _Onload) -> None:
        while onload.replaced:  # each name leaves the record only after it is restored
            name = next(reversed(onload.replaced))
            _put_back(*onload.replaced[name])
            del onload.replaced[name]
        if type(module).__name__ == "Linear8bitLt":  # bitsandbytes caches derived tensors
            module.state.SCB = None
            module.state.CxB = None
        while onload.tied_pointers:
            pointer, device = next(iter(onload.tied_pointers))
            self.tied_params_map.get(pointer, {}).pop(device, None)
            onload.tied_pointers.discard((pointer, device))

    def detach_hook(self, module):
        if not self.offload:
            return module
        for name, device in self.original_devices.items():
            if device == torch.device("meta"):
                continue
            if _tensor(module, name).device.type != "meta":
                # Not offloaded (a buffer, or a tie with a resident module): move the live
                # tensor, so updates (running statistics) and ties survive.
                set_module_tensor_to_device(module, name, device, clear_cache=False)
                continue
            value = self.weights_map.get(name, None)
            set_module_tensor_to_device(
                module,
                name,
                device,
                value=value,
                fp16_statistics=self._maybe_get_fp16_statistics(name, value),
                clear_cache=False,
            )
        return module


def _refuse_gradient(message: str, gradient: torch.Tensor):
    raise RuntimeError(message)


def _strip_prefixes(weights_map: Mapping | None) -> tuple[Mapping | None, str]:
    """The mapping under nested `PrefixedDataset`s, and the prefix they add together."""
    prefix = ""
    while isinstance(weights_map, PrefixedDataset) or type(weights_map).__name__ == (
        "PrefixedDataset"  # accelerate's own class behaves the same
    ):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    return weights_map, prefix


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:  # a direct tensor: the hooks' common case
        return module, name
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(module, name)
    return getattr(owner, leaf)


def _private_copies(read: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: read().clone()


def _put_back(fetch: _Fetch, tensor: torch.Tensor) -> None:
    """Sets the tensor ``fetch`` names back to ``tensor`` (what its forward replaced)."""
    if fetch.leaf in fetch.owner._buffers:
        fetch.owner._buffers[fetch.leaf] = tensor
    else:
        fetch.owner._parameters[fetch.leaf] = tensor


def _is_on(tensor: torch.Tensor, device) -> bool:
    """True when ``tensor`` has data and is where ``device`` wants it (None: anywhere)."""
    if tensor.is_meta:
        return False
    if device is None:
        return True
    target = _parsed_device(device)
    return tensor.device == target or check_device_same(tensor.device, target)


@functools.lru_cache(maxsize=64)
def _parsed_device(device: int | str | torch.device) -> torch.device:
    """``torch.device(device)``, parsed once per distinct value (hooks ask per weight)."""
    return torch.device(device)


# --------------------------------------------------------------------------------------
# Attaching hooks to a model
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Offload inspection
# --------------------------------------------------------------------------------------


def _offload_hook(hook: ModelHook | None) -> AlignDevicesHook | None:
    """The offloading `AlignDevicesHook` in ``hook`` (looking inside `SequentialHook`s)."""
    if isinstance(hook, AlignDevicesHook):
        return hook if hook.offload else None
    for inner in getattr(hook, "hooks", ()) if isinstance(hook, SequentialHook) else ():
        found = _offload_hook(inner)
        if found is not None:
            return found
    return None


def has_offloaded_params(module: nn.Module) -> bool:
    """True when ``module`` has an offloading `AlignDevicesHook` (alone or in a
    `SequentialHook`, which accelerate does not recognise)."""
    return _offload_hook(getattr(module, "_hf_hook", None)) is not None


def iter_offload_hooks(model: nn.Module) -> Iterator[tuple[str, nn.Module, AlignDevicesHook]]:
    """``(module name, module, hook)`` for every module of ``model`` with an offloading
    `AlignDevicesHook`, in ``named_modules`` order: where a prefetcher is installed."""
    for name, module in model.named_modules():
        hook = _offload_hook(getattr(module, "_hf_hook", None))
        if hook is not None:
            yield name, module, hook


@contextmanager
def align_module_device(module: nn.Module, execution_device=None) -> Iterator[None]:
    """Materialises ``module``'s weights for the duration of the block.

    An offloaded module is loaded as for a forward (on ``execution_device`` when given, else
    its hook's) and offloaded again on exit. A module that is not offloaded has its direct
    parameters moved to ``execution_device`` (when given) and back.
    """
    hook = _offload_hook(getattr(module, "_hf_hook", None))
    if hook is not None:
        hook_device = hook.execution_device
        if execution_device is not None:
            hook.execution_device = execution_device
        try:
            hook.pre_forward(module)
            try:
                yield
            finally:
                hook.post_forward(module, None)
        finally:
            hook.execution_device = hook_device
    elif execution_device is not None:
        devices = {name: p.device for name, p in module.named_parameters(recurse=False)}
        try:
            for name in devices:
                set_module_tensor_to_device(module, name, execution_device)
            yield
        finally:
            for name, device in devices.items():
                set_module_tensor_to_device(module, name, device)
    else:
        yield


# --------------------------------------------------------------------------------------
# Whole-model CPU offload and layerwise casting
# --------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    """accelerate's ``PartialState().default_device`` without creating global state."""
    if torch.backends.mps.is_available():
        os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"
        return torch.device("mps")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


class CpuOffload(ModelHook):
    """Keeps a whole model on CPU until its forward, then moves it to ``execution_device``
    where it stays until ``init_hook`` (or `UserCpuOffloadHook.offload`) runs again.

    Args:
        execution_device: defaults to MPS, else CUDA, else XPU, else CPU.
        prev_module_hook: a `UserCpuOffloadHook` whose model is sent back to CPU when this
            model's forward starts (a pipeline of models sharing one device).
    """

    def __init__(self, execution_device=None, prev_module_hook: UserCpuOffloadHook | None = None):
        self.prev_module_hook = prev_module_hook
        self.execution_device = (
            execution_device if execution_device is not None else _default_device()
        )

    def init_hook(self, module):
        return module.to("cpu")

    @_not_compiled
    def pre_forward(self, module, *args, **kwargs):
        if isinstance(self.prev_module_hook, UserCpuOffloadHook):
            previous_model = self.prev_module_hook.model
            if next(previous_model.parameters()).device != torch.device("cpu"):
                self.prev_module_hook.offload()
                _empty_device_cache()
        # As in accelerate, inputs are left alone when the model is already in place.
        if next(module.parameters()).device == self.execution_device:
            return args, kwargs
        module.to(self.execution_device)
        return (
            send_to_device(args, self.execution_device),
            send_to_device(kwargs, self.execution_device),
        )


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif torch.backends.mps.is_available():
        torch.mps.empty_cache()


class UserCpuOffloadHook:
    """What `cpu_offload_with_hook` returns: ``offload()`` sends the model back to CPU,
    ``remove()`` removes the hook."""

    def __init__(self, model: nn.Module, hook: ModelHook):
        self.model = model
        self.hook = hook

    def offload(self) -> None:
        """Moves the model back to CPU."""
        self.hook.init_hook(self.model)

    def remove(self) -> None:
        """Removes the hook from the model."""
        remove_hook_from_module(self.model)


class LayerwiseCastingHook(ModelHook):
    """Stores a layer's floating-point weights in ``storage_dtype`` and casts them to
    ``compute_dtype`` for the forward only. Inputs are not cast."""

    _is_stateful = False

    def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype, non_blocking: bool):
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype
        self.non_blocking = non_blocking

    def init_hook(self, module):
        module.to(dtype=self.storage_dtype, non_blocking=self.non_blocking)
        return module

    @_not_compiled
    def pre_forward(self, module, *args, **kwargs):
        module.to(dtype=self.compute_dtype, non_blocking=self.non_blocking)
        return args, kwargs

    @_not_compiled
    def post_forward(self, module, output):
        module.to(dtype=self.storage_dtype, non_blocking=self.non_blocking)
        return output

    def abort_forward(self, module):
        module.to(dtype=self.storage_dtype, non_blocking=self.non_blocking)


def attach_layerwise_casting_hooks(
    module: nn.Module,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    skip_modules_pattern: str | tuple[str, ...] | None = None,
    skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
    non_blocking: bool = False,
) -> None:
    """Appends a `LayerwiseCastingHook` to every Linear/Conv/ConvTranspose layer of
    ``module``, except layers under a skipped class or whose dotted name matches one of
    ``skip_modules_pattern`` (regular expressions, searched; a single string is one
    pattern)."""
    if isinstance(skip_modules_pattern, str):
        skip_modules_pattern = (skip_modules_pattern,)
    patterns = [re.compile(pattern) for pattern in skip_modules_pattern or ()]
    hook_args = (storage_dtype, compute_dtype, non_blocking)
    _attach_casting(module, "", patterns, skip_modules_classes, hook_args)


def _attach_casting(module, name, patterns, skip_classes, hook_args) -> None:
    if skip_classes is not None and isinstance(module, skip_classes):
        return
    if any(pattern.search(name) for pattern in patterns):
        return
    if isinstance(module, SUPPORTED_PYTORCH_LAYERS_FOR_UPCASTING):
        add_hook_to_module(module, LayerwiseCastingHook(*hook_args), append=True)
        return
    for child_name, child in module.named_children():
        child_path = f"{name}.{child_name}" if name else child_name
        _attach_casting(child, child_path, patterns, skip_classes, hook_args)
