"""Finding offloading hooks in a model, and using them outside a forward.

`has_offloaded_params` and `align_module_device` are accelerate's; `iter_offload_hooks` is
where bigmodel installs its read-ahead and its forward lock (`share_forward_lock`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from bigmodel.hooks.align import AlignDevicesHook
from bigmodel.hooks.protocol import ForwardLock, ModelHook, SequentialHook
from bigmodel.tensors import set_module_tensor_to_device


def offloading_hook_in(hook: ModelHook | None) -> AlignDevicesHook | None:
    """The offloading `AlignDevicesHook` in ``hook`` (looking inside `SequentialHook`s)."""
    if isinstance(hook, AlignDevicesHook):
        return hook if hook.offload else None
    for inner in getattr(hook, "hooks", ()) if isinstance(hook, SequentialHook) else ():
        found = offloading_hook_in(inner)
        if found is not None:
            return found
    return None


def has_offloaded_params(module: nn.Module) -> bool:
    """True when ``module`` has an offloading `AlignDevicesHook` (alone or in a
    `SequentialHook`, which accelerate does not recognise)."""
    return offloading_hook_in(getattr(module, "_hf_hook", None)) is not None


def iter_offload_hooks(model: nn.Module) -> Iterator[tuple[str, nn.Module, AlignDevicesHook]]:
    """``(module name, module, hook)`` for every module of ``model`` with an offloading
    `AlignDevicesHook`, in ``named_modules`` order: where a prefetcher is installed."""
    for name, module in model.named_modules():
        hook = offloading_hook_in(getattr(module, "_hf_hook", None))
        if hook is not None:
            yield name, module, hook


@contextmanager
def align_module_device(module: nn.Module, execution_device=None) -> Iterator[None]:
    """Materialises ``module``'s weights for the duration of the block.

    An offloaded module is loaded as for a forward (on ``execution_device`` when given, else
    its hook's) and offloaded again on exit. A module that is not offloaded has its direct
    parameters moved to ``execution_device`` (when given) and back.
    """
    hook = offloading_hook_in(getattr(module, "_hf_hook", None))
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
