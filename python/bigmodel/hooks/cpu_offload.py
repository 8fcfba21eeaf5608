"""Whole-model CPU offload: the model lives on CPU and moves to its execution device for its
forward (`cpu_offload_with_hook`), possibly as one stage of a pipeline of models."""

from __future__ import annotations

import os

import torch
from torch import nn

from bigmodel.hooks.protocol import ModelHook, _not_compiled, remove_hook_from_module
from bigmodel.operations import send_to_device


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
