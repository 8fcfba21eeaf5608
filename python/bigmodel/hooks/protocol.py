"""The hook protocol: callbacks around a module's forward, attached and removed.

`add_hook_to_module` replaces ``module.forward`` by a ``functools.partial`` that runs
``hook.pre_forward`` → the original forward → ``hook.post_forward``. The attribute names
(``_hf_hook``, ``_old_forward``) and the partial (deepcopy-safe, ``__wrapped__``, signature
preserved) are the ones accelerate uses: transformers and PEFT read them.

A bigmodel extension: when a forward raises (KeyboardInterrupt too), ``abort_forward`` runs
instead of ``post_forward``, so a hook can undo what its ``pre_forward`` did.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch import nn

# Instance attributes `dispatch_model` sets to guard moves; removing hooks restores the class's.
_DISPATCH_ATTRIBUTES = ("to", "cuda", "npu", "xpu", "mlu", "sdaa", "musa")


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
