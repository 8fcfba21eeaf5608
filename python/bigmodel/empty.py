"""Building models without allocating their weights: `init_empty_weights`, `init_on_device`.

Inside ``init_empty_weights()`` every parameter a module registers lands on the ``meta``
device (shape and dtype, no storage), so a model of any size is built in milliseconds and
without RAM; the weights come later from a checkpoint or a store.

Unlike accelerate, the parameter redirection is per thread: another thread building a
module at the same time is not affected, and the contexts nest (the innermost device wins).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Environment variables that give `include_buffers` its default; the first one set wins.
_INCLUDE_BUFFERS_ENV = ("BIGMODEL_INIT_INCLUDE_BUFFERS", "ACCELERATE_INIT_INCLUDE_BUFFERS")
_TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")
_FALSE_WORDS = ("n", "no", "f", "false", "off", "0")

# Devices requested by the active `init_on_device(include_buffers=False)` blocks of each thread.
_thread_state = threading.local()
# The process-wide patch of `nn.Module.register_parameter` is installed while any block is open.
_patch_lock = threading.Lock()
_open_blocks = 0
_original_register_parameter = nn.Module.register_parameter


def _include_buffers_default() -> bool:
    """The default of `include_buffers`, read from the environment as accelerate does."""
    for variable in _INCLUDE_BUFFERS_ENV:
        value = os.environ.get(variable)
        if value is None:
            continue
        word = value.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError(f"invalid truth value {value} (environment variable {variable})")
    return False


@contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Creates every parameter registered in the block on the ``meta`` device.

    Args:
        include_buffers: also create buffers (and every other tensor made by a factory
            function) on ``meta``. Defaults to the environment variable
            ``BIGMODEL_INIT_INCLUDE_BUFFERS`` or ``ACCELERATE_INIT_INCLUDE_BUFFERS``, else False.

    A model built this way has no data: load it with ``load_checkpoint_and_dispatch`` (or
    ``set_module_tensor_to_device(..., value=...)``) before running it.
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


@contextmanager
def init_on_device(
    device: torch.device | str, include_buffers: bool | None = None
) -> Iterator[None]:
    """Creates every parameter registered in the block directly on ``device``.

    Args:
        device: where parameters (and buffers, with ``include_buffers``) are placed.
        include_buffers: with True the block simply makes ``device`` torch's default device,
            so buffers and plain tensors land there too; with False only parameters move
            (each is created where the layer puts it, then moved). Defaults as in
            `init_empty_weights`.
    """
    if include_buffers is None:
        include_buffers = _include_buffers_default()
    if include_buffers:
        with torch.device(device):
            yield
        return
    stack = _device_stack()
    stack.append(torch.device(device))
    _acquire_patch()
    try:
        yield
    finally:
        stack.pop()
        _release_patch()


def _device_stack() -> list[torch.device]:
    stack = getattr(_thread_state, "devices", None)
    if stack is None:
        stack = _thread_state.devices = []
    return stack


def _acquire_patch() -> None:
    global _open_blocks, _original_register_parameter
    with _patch_lock:
        if _open_blocks == 0:
            _original_register_parameter = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter_on_device
        _open_blocks += 1


def _release_patch() -> None:
    global _open_blocks
    with _patch_lock:
        _open_blocks -= 1
        if _open_blocks == 0:
            nn.Module.register_parameter = _original_register_parameter


def _register_parameter_on_device(module: nn.Module, name: str, param) -> None:
    """`nn.Module.register_parameter`, then a move to this thread's requested device."""
    _original_register_parameter(module, name, param)
    stack = getattr(_thread_state, "devices", None)
    if param is not None and stack:
        module._parameters[name] = _parameter_on(module._parameters[name], stack[-1])


def _parameter_on(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """The same parameter (class, requires_grad, attributes) rebuilt on ``device``."""
    attributes = dict(param.__dict__)
    # transformers marks initialised parameters with this flag; it is not a constructor argument.
    hf_initialized = attributes.pop("_is_hf_initialized", None)
    param_class = type(param)
    if param_class is nn.Parameter:
        moved = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
        moved.__dict__.update(attributes)
    else:
        # Parameter subclasses (bitsandbytes, ...) take their attributes as constructor kwargs.
        moved = param_class(param.to(device), requires_grad=param.requires_grad, **attributes)
    if hf_initialized is not None:
        moved._is_hf_initialized = hf_initialized
    return moved
