"""Weight swapping: how an offloading hook puts its module's weights in place for one forward
and takes them back after.

Between forwards an offloaded module holds ``meta`` placeholders. The first forward resolves
the hook's offloaded names once (its *fetch plan*): each to the module that owns the tensor,
the tensor's attribute name, and a reader that goes straight to the store when the weights
map offers one (``reader``), so later forwards do no name lookups. Each forward then:

1. reads every weight (from the store's cache when read-ahead kept up); for a CUDA execution
   device, takes the copies the read-ahead queued through the device's `CopyWindow`, or
   queues them now (`bigmodel.transfer`);
2. installs it: in place for a plain parameter (`_swap_in_place`), else through
   `set_module_tensor_to_device` (ties, dtype casts, bitsandbytes statistics);
3. records what it replaced (`Onload`), so that the post-forward, or an abort, puts every
   placeholder back, even when interrupted half-way.

The hook's settings (execution device, weights map, tied-parameters map) are read at each
call: changing them on the hook takes effect at its next forward.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from bigmodel.offload import unwrap_prefixes
from bigmodel.tensors import (
    check_device_same,
    get_tensor,
    owner_and_leaf,
    set_module_tensor_to_device,
)
from bigmodel.transfer import Copied, HostToDevice, Reads

if TYPE_CHECKING:
    from bigmodel.hooks.align import AlignDevicesHook


@dataclass(frozen=True)
class Fetch:
    """One offloaded tensor, resolved once: where it lives in the module, and how to read
    its value (a closure that goes straight to the store when the weights map allows)."""

    name: str
    owner: nn.Module
    leaf: str
    read: Callable[[], torch.Tensor]


@dataclass
class Onload:
    """What one offloading pre-forward changed, so the post-forward (or an abort) can undo it."""

    # name -> (its fetch, the tensor the module held before: its meta placeholder, usually)
    replaced: dict[str, tuple[Fetch, torch.Tensor]] = field(default_factory=dict)
    # (data pointer, device) entries this forward added to the tied-parameters map
    tied_pointers: set = field(default_factory=set)
    # whether it holds a place in the device's `CopyWindow` (released by the put-back)
    in_window: bool = False


class WeightSwap:
    """The swapping state of one offloading hook: its fetch plan and one `Onload` record
    per forward in progress (a module may run inside its own forward)."""

    def __init__(self) -> None:
        self.onloads: list[Onload] = []
        # Copies weights to a CUDA execution device (set by the hook's init; None else).
        self.host_to_device: HostToDevice | None = None
        # The hook's offloaded names resolved against its weights map, and that map.
        self._plan: list[Fetch] = []
        self._planned_for: Mapping | None = None

    def __deepcopy__(self, memo: dict) -> WeightSwap:
        # The plan's readers close over the original weights map: a copy (of a deep-copied
        # model) resolves its own against its copied map on its first forward.
        copied = WeightSwap()
        memo[id(self)] = copied
        copied.onloads = copy.deepcopy(self.onloads, memo)
        copied.host_to_device = self.host_to_device  # one per device, shared
        return copied

    def load(self, hook: AlignDevicesHook, module: nn.Module) -> None:
        """Puts every offloaded weight of ``module`` on the hook's execution device. On an
        error the caller must `put_back` (what was loaded so far is recorded)."""
        onload = Onload()
        self.onloads.append(onload)
        fetches = self._fetches(hook, module)
        copies: dict[str, Copied] = {}
        if self.host_to_device is not None:
            onload.in_window = True
            copies = self.host_to_device.window.take(hook, _pending(hook, fetches))
        for fetch in fetches:
            self._onload(hook, module, fetch, copies.get(fetch.name))

    def copy_ahead(self, hook: AlignDevicesHook, module: nn.Module) -> bool:
        """Queues the copies of ``module``'s weights to a CUDA execution device ahead of its
        forward (see `CopyWindow.stage`). False when there is no CUDA device to copy to or
        its window is full."""
        if self.host_to_device is None:
            return False
        if self.onloads:
            return True  # running now: its weights are in place
        return self.host_to_device.window.stage(hook, _pending(hook, self._fetches(hook, module)))

    def put_back(self, hook: AlignDevicesHook, module: nn.Module) -> None:
        """Puts back what the innermost `load` replaced; the fetched values (and the store
        bytes they pin) are released with them. The record leaves the stack only once
        everything is back, and a KeyboardInterrupt landing mid-way finishes the restore
        before it propagates, so no weight stays loaded (and pinned)."""
        if not self.onloads:
            return
        onload = self.onloads[-1]
        if onload.in_window:
            onload.in_window = False
            self.host_to_device.window.release(hook)
        try:
            _restore(module, onload, hook.tied_params_map)
        except BaseException:
            _restore(module, onload, hook.tied_params_map)  # finish what was cut short
            raise
        finally:
            if not onload.replaced:
                self.onloads.pop()

    def _fetches(self, hook: AlignDevicesHook, module: nn.Module) -> list[Fetch]:
        """The hook's offloaded names resolved to owners and readers, once per weights map
        (replacing the hook's ``weights_map`` resolves again)."""
        if self._planned_for is not hook.weights_map:
            self._plan = fetch_plan(module, hook.offloaded_names, hook.weights_map)
            self._planned_for = hook.weights_map
        return self._plan

    def _onload(
        self, hook: AlignDevicesHook, module: nn.Module, fetch: Fetch, copied: Copied | None
    ) -> None:
        """Puts one weight on the execution device: ``copied`` there already (a CUDA
        device), else read from the weights map and installed (which moves it)."""
        name, owner, leaf = fetch.name, fetch.owner, fetch.leaf
        device = hook.execution_device
        current = getattr(owner, leaf)
        if is_on(current, device):
            # Already resident (a tie with a resident module, or an enclosing forward of
            # this module loaded it): use it in place, which keeps the tie intact.
            return
        onload = self.onloads[-1]
        onload.replaced[name] = (fetch, current)
        if copied is None:
            value = fetch.read()
            pointer = value.data_ptr()
        else:
            value, pointer = copied.tensor, copied.source_pointer
        tied = _tied_copies(hook, name, pointer)
        if tied is None and _swap_in_place(hook, owner, leaf, current, value):
            _refuse_training(hook, module, name)
            return
        if tied is not None and device in tied:
            # Another forward in progress made this tied weight's copy: share it.
            owner._parameters[leaf] = tied[device]
            return
        install(module, name, device, value, hook.weights_map)
        if tied is not None:
            tied[device] = get_tensor(module, name)
            onload.tied_pointers.add((pointer, device))
        _refuse_training(hook, module, name)


def fetch_plan(module: nn.Module, names: list[str], weights_map: Mapping) -> list[Fetch]:
    """``names`` (tensors of ``module``) resolved to their owners and to readers of
    ``weights_map``: straight to the store when the map under its prefixes has ``reader``."""
    source, prefix = unwrap_prefixes(weights_map)
    reader = getattr(source, "reader", None)
    plan = []
    for name in names:
        owner, leaf = owner_and_leaf(module, name)
        if reader is None:
            read = functools.partial(weights_map.__getitem__, name)
        elif leaf in owner._buffers:
            # A module may write its buffers (batch-norm statistics): it gets a private
            # copy, as from accelerate's disk offload, never the bytes the store shares
            # with other holders.
            read = _private_copies(reader(prefix + name))
        else:
            read = reader(prefix + name)
        plan.append(Fetch(name, owner, leaf, read))
    return plan


def install(
    module: nn.Module,
    name: str,
    device,
    value: torch.Tensor | None,
    weights_map: Mapping,
    tied_params_map: dict | None = None,
) -> None:
    """Sets tensor ``name`` of ``module`` to ``value`` (read from ``weights_map``) on
    ``device``, with the statistics bitsandbytes keeps beside an int8 weight."""
    set_module_tensor_to_device(
        module,
        name,
        device,
        value=value,
        fp16_statistics=_fp16_statistics(weights_map, name, value),
        tied_params_map=tied_params_map,
        clear_cache=False,
    )


def _fp16_statistics(weights_map: Mapping, name: str, value: torch.Tensor | None):
    """The int8 scale statistics bitsandbytes keeps beside an int8 weight ("SCB"), if any."""
    if value is None or value.dtype != torch.int8 or "weight" not in name:
        return None
    statistics_name = name.replace("weight", "SCB")
    if statistics_name in weights_map:
        return weights_map[statistics_name]
    return None


def _tied_copies(hook: AlignDevicesHook, name: str, pointer: int) -> dict | None:
    """The device copies of the tied weight ``name`` read from host ``pointer`` (the
    tied-parameters map is keyed by host pointers), or None when it is not tied. Weights
    tied by name get their entry on the fly: values read from disk change pointer."""
    tied_map = hook.tied_params_map
    if tied_map is None:
        return None
    if name in hook.tied_params_names and pointer not in tied_map:
        tied_map[pointer] = {}
    return tied_map.get(pointer)


def _pending(hook: AlignDevicesHook, fetches: list[Fetch]) -> Reads:
    """(name, reader) of the fetched weights not already on the execution device."""
    device = hook.execution_device
    return [(f.name, f.read) for f in fetches if not is_on(getattr(f.owner, f.leaf), device)]


def _swap_in_place(hook: AlignDevicesHook, owner, leaf: str, current, value) -> bool:
    """Installs ``value`` as ``owner.<leaf>`` in the common case, without the general
    machinery of `set_module_tensor_to_device` (this runs for every weight of every
    forward): a plain parameter (not tied) whose fetched value already has its device,
    dtype and shape. Returns False, changing nothing, in any other case."""
    if (
        type(current) is not nn.Parameter
        or value.dtype != current.dtype
        or value.shape != current.shape
        or not is_on(value, hook.execution_device)
    ):
        return False
    parameter = nn.Parameter(value, requires_grad=current.requires_grad)
    if hasattr(current, "_is_hf_initialized"):  # transformers' loaded-weight flag
        parameter._is_hf_initialized = current._is_hf_initialized
    owner._parameters[leaf] = parameter
    return True


def _refuse_training(hook: AlignDevicesHook, module: nn.Module, name: str) -> None:
    """Makes backward fail loudly on an onloaded parameter: it is a copy that is dropped
    after the forward, so an optimizer step could never update the offloaded weight."""
    if not torch.is_grad_enabled():  # first: inference pays nothing more
        return
    parameter = get_tensor(module, name)
    if not parameter.requires_grad:
        return
    if hook.module_name:
        full_name = f"{hook.module_name}.{name}"
    else:
        full_name = unwrap_prefixes(hook.weights_map)[1] + name
    message = (
        f"cannot compute the gradient of parameter '{full_name}' (in "
        f"{type(module).__name__}): its module is offloaded, so the parameter is a "
        "temporary copy loaded for one forward and an optimizer could never update it. "
        "Offloaded weights cannot be trained: keep trainable modules on their execution "
        "device, or call requires_grad_(False) on offloaded modules (inputs can still get "
        "gradients). For inference, run the model under torch.no_grad()."
    )
    parameter.register_hook(functools.partial(_refuse_gradient, message))


def _refuse_gradient(message: str, gradient: torch.Tensor):
    raise RuntimeError(message)


def _restore(module: nn.Module, onload: Onload, tied_map: dict | None) -> None:
    while onload.replaced:  # each name leaves the record only after it is restored
        name = next(reversed(onload.replaced))
        _put_back(*onload.replaced[name])
        del onload.replaced[name]
    if type(module).__name__ == "Linear8bitLt":  # bitsandbytes caches derived tensors
        module.state.SCB = None
        module.state.CxB = None
    while onload.tied_pointers:
        pointer, device = next(iter(onload.tied_pointers))
        tied_map.get(pointer, {}).pop(device, None)
        onload.tied_pointers.discard((pointer, device))


def _private_copies(read: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: read().clone()


def _put_back(fetch: Fetch, tensor: torch.Tensor) -> None:
    """Sets the tensor ``fetch`` names back to ``tensor`` (what its forward replaced)."""
    if fetch.leaf in fetch.owner._buffers:
        fetch.owner._buffers[fetch.leaf] = tensor
    else:
        fetch.owner._parameters[fetch.leaf] = tensor


def is_on(tensor: torch.Tensor, device) -> bool:
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
