"""A clear error, instead of wrong outputs, for layers added around offloaded modules after
dispatch whose weights were left on the ``meta`` device.

peft (``get_peft_model``, and transformers' ``load_adapter``, which uses it) wraps each target
module in a layer that also holds the adapter's weights, and moves those weights to the device
of the target's weight. For an offloaded module that weight is a ``meta`` placeholder, so the
adapter's values are dropped; on CPU ``F.linear`` with a meta weight then returns uninitialised
memory, and the model's outputs are silently wrong (accelerate behaves the same). No offload
hook can serve those weights: nothing holds their values any more.

So when an offloaded module is registered under a new parent (peft's layers take the wrapped
module as ``base_layer`` in their constructor), the parent gets a forward pre-hook that, before
each of its forwards, refuses meta tensors that no offload hook serves, naming the modules and
the fix. A wrapper whose tensors all hold values (assigned after the wrapping, say) runs as
usual; only wrappers of offloaded modules pay for the check (a walk over their few tensors).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from bigmodel.hooks.align import AlignDevicesHook
from bigmodel.hooks.offloaded import offloading_hook_in

_install_lock = threading.Lock()
_installed = False
# The parents given the check (each gets it once).
_wrappers: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def watch_offloaded_modules() -> None:
    """Installs (once per process) the torch module-registration hook that gives the new
    parents of offloaded modules their check. Called when an offload hook is attached."""
    global _installed
    with _install_lock:
        if not _installed:
            torch.nn.modules.module.register_module_module_registration_hook(_on_registered)
            _installed = True


def _on_registered(parent: nn.Module, name: str, child: nn.Module | None):
    # Runs on every submodule assignment in the process: the common case must stay cheap.
    if child is None or parent in _wrappers or offloading_hook_in(_hook_of(child)) is None:
        return None
    _wrappers.add(parent)
    parent.register_forward_pre_hook(_refuse_unserved_meta_tensors)
    return None


def _hook_of(module: nn.Module):
    return module.__dict__.get("_hf_hook")


def _refuse_unserved_meta_tensors(wrapper: nn.Module, args) -> None:
    names = list(_unserved_meta_tensors(wrapper))
    if not names:
        return
    wrapper_class = f"{type(wrapper).__module__}.{type(wrapper).__qualname__}"
    raise RuntimeError(
        f"{wrapper_class} around the offloaded module '{_offloaded_name(wrapper)}' "
        f"was added after the model was dispatched, and its tensors {', '.join(names)} are on "
        "the meta device with no values: they were moved to the device of the offloaded "
        "weight, a placeholder, so this forward would compute with uninitialised memory (the "
        "same holds for every layer added around an offloaded module after dispatch). Add "
        "adapters before dispatching: load the base model without a device_map, apply the "
        "adapter (get_peft_model, load_adapter), then dispatch it; or load it with "
        "PeftModel.from_pretrained(base_model, adapter, max_memory=..., offload_folder=...), "
        "which dispatches the model again, adapter included."
    )


def _unserved_meta_tensors(module: nn.Module, prefix: str = "") -> Iterator[str]:
    """Names (relative to the wrapper) of the meta parameters and buffers under ``module``
    that no offload hook fetches. The subtree of a module with an offloading hook is skipped:
    its hooks serve it, and a layer added inside it later is a wrapper with its own check."""
    if offloading_hook_in(_hook_of(module)) is not None:
        return
    for name, tensor in itertools.chain(module._parameters.items(), module._buffers.items()):
        if tensor is not None and tensor.device.type == "meta":
            yield prefix + name
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _unserved_meta_tensors(child, f"{prefix}{child_name}.")


def _offloaded_name(wrapper: nn.Module) -> str:
    """The dotted name, in its model, of the offloaded module ``wrapper`` wraps."""
    for module in wrapper.modules():
        hook = offloading_hook_in(_hook_of(module))
        if isinstance(hook, AlignDevicesHook) and hook.module_name:
            return hook.module_name
    return type(wrapper).__name__
