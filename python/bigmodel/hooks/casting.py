"""Layerwise casting: weights stored in a small dtype, cast to the compute dtype for each
forward of the layers that use them in one matmul or convolution."""

from __future__ import annotations

import re

import torch
from torch import nn

from bigmodel.hooks.protocol import ModelHook, _not_compiled, add_hook_to_module

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
