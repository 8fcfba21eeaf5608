"""bigmodel: run PyTorch models bigger than the memory of the device that computes them.

The public names match accelerate's big-modeling API, so switching is a change of import::

    from bigmodel import init_empty_weights, load_checkpoint_and_dispatch

Names are resolved on first use, so ``import bigmodel`` stays cheap and a program that only
inspects stores does not pay for the planning and hook machinery.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (of this package) that defines it
_EXPORTS = {
    "init_empty_weights": "empty",
    "init_on_device": "empty",
    "cpu_offload": "dispatch",
    "cpu_offload_with_hook": "dispatch",
    "disk_offload": "dispatch",
    "dispatch_model": "dispatch",
    "attach_layerwise_casting_hooks": "hooks",
    "infer_auto_device_map": "planning.planner",
    "load_checkpoint_in_model": "loading",
    "load_checkpoint_and_dispatch": "loading",
    "patch_accelerate": "integration",
    "TensorStore": "store",
    "write_store": "store",
    "StoreError": "errors",
    "TensorNotFoundError": "errors",
    "CorruptStoreError": "errors",
    "IncompleteStoreError": "errors",
    "StoreFormatError": "errors",
}

__all__ = [
    "CorruptStoreError",
    "IncompleteStoreError",
    "StoreError",
    "StoreFormatError",
    "TensorNotFoundError",
    "TensorStore",
    "attach_layerwise_casting_hooks",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "patch_accelerate",
    "write_store",
]


# Submodules reachable as attributes after a plain ``import bigmodel``, as ``accelerate.utils``
# and ``accelerate.hooks`` are after ``import accelerate``; imported on first use too.
_SUBMODULES = ("hooks", "utils")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f"bigmodel.{name}")  # the import sets the attribute
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bigmodel' has no attribute {name!r}")
    value = getattr(import_module(f"bigmodel.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


if TYPE_CHECKING:
    from bigmodel.dispatch import cpu_offload, cpu_offload_with_hook, disk_offload, dispatch_model
    from bigmodel.empty import init_empty_weights, init_on_device
    from bigmodel.errors import (
        CorruptStoreError,
        IncompleteStoreError,
        StoreError,
        StoreFormatError,
        TensorNotFoundError,
    )
    from bigmodel.hooks import attach_layerwise_casting_hooks
    from bigmodel.integration import patch_accelerate
    from bigmodel.loading import load_checkpoint_and_dispatch, load_checkpoint_in_model
    from bigmodel.planning.planner import infer_auto_device_map
    from bigmodel.store import TensorStore, write_store
