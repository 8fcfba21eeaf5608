"""Putting bigmodel under transformers, diffusers, peft and sentence-transformers.

Those libraries call accelerate's big-modeling functions for their users
(``from_pretrained(device_map=..., offload_folder=...)``, ``enable_model_cpu_offload()``,
``PeftModel.from_pretrained`` on a dispatched model). `patch_accelerate` makes those calls run
on bigmodel::

    import bigmodel

    with bigmodel.patch_accelerate():
        model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", offload_folder="off")

    patch = bigmodel.patch_accelerate()   # or for the rest of the program ...
    patch.undo()                          # ... until undone

What it changes: every name of `REPLACED` is rebound to bigmodel's object of the same name, in
accelerate's modules and in the modules of `CLIENT_PACKAGES` already imported, which bound
their own copies with ``from accelerate import dispatch_model``. Modules imported later find
bigmodel's objects in accelerate's modules. Undoing rebinds accelerate's objects wherever
bigmodel's were put, including in modules imported while patched. Patches nest: only the
last ``undo()`` restores accelerate. A model dispatched while patched keeps bigmodel's hooks
after undo.

Kept from accelerate on purpose: general tensor utilities (`set_module_tensor_to_device`,
`send_to_device`, ...), whose accelerate versions handle quantized parameter classes that the
clients' quantizers pass, and everything outside big modeling (``Accelerator``, training).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Mapping
from importlib import import_module
from types import ModuleType

from bigmodel import dispatch, empty, hooks, loading, utils

# The packages whose modules may hold their own bindings of accelerate's names.
CLIENT_PACKAGES = ("accelerate", "transformers", "diffusers", "peft", "sentence_transformers")

# accelerate module -> (names it defines that bigmodel replaces, the bigmodel module of each).
REPLACED: dict[str, dict[str, ModuleType]] = {
    "accelerate.big_modeling": {
        "init_empty_weights": empty,
        "init_on_device": empty,
        "cpu_offload": dispatch,
        "cpu_offload_with_hook": dispatch,
        "disk_offload": dispatch,
        "dispatch_model": dispatch,
        "load_checkpoint_and_dispatch": loading,
        "attach_layerwise_casting_hooks": hooks,
    },
    "accelerate.hooks": {
        name: hooks
        for name in (
            "ModelHook",
            "SequentialHook",
            "AlignDevicesHook",
            "CpuOffload",
            "UserCpuOffloadHook",
            "LayerwiseCastingHook",
            "add_hook_to_module",
            "remove_hook_from_module",
            "remove_hook_from_submodules",
            "attach_execution_device_hook",
            "attach_align_device_hook",
            "attach_align_device_hook_on_blocks",
        )
    },
    "accelerate.utils.modeling": {
        name: utils
        for name in (
            "infer_auto_device_map",
            "check_device_map",
            "clean_device_map",
            "get_module_size_with_ties",
            "fallback_allocate",
            "get_balanced_memory",
            "get_max_memory",  # converted in place: see `get_max_memory_in_place`
            "compute_module_sizes",
            "compute_module_total_buffer_size",
            "get_max_layer_size",
            "calculate_maximum_sizes",
            "load_checkpoint_in_model",
            "get_state_dict_offloaded_model",
            "get_state_dict_from_offload",
            "has_offloaded_params",
            "align_module_device",
        )
    },
}


@functools.wraps(utils.get_max_memory)
def get_max_memory_in_place(max_memory=None):
    """`bigmodel.utils.get_max_memory`, after converting the size strings of the caller's
    ``max_memory`` to ints in place, as accelerate does: transformers compares the caller's
    dict with the result (``min(max_memory[d], final[d])``) and fails on a string."""
    if max_memory is not None:
        for key, value in max_memory.items():
            if isinstance(value, str):
                max_memory[key] = utils.convert_file_size_to_int(value)
    return utils.get_max_memory(max_memory)


def _check_device_map_as_accelerate_holds_it(model, device_map_) -> None:
    """bigmodel's dispatch check while patched: whatever ``accelerate.big_modeling`` holds,
    which is bigmodel's `check_device_map`, except inside transformers'
    ``skip_device_map_check()``, which swaps in a function that checks nothing."""
    sys.modules["accelerate.big_modeling"].check_device_map(model, device_map_)


_lock = threading.Lock()
_active_patches = 0


class AcceleratePatch:
    """The handle `patch_accelerate` returns: ``undo()`` (or leaving the ``with`` block)
    restores accelerate once every patch taken is undone. Undoing twice does nothing."""

    def __init__(self) -> None:
        self._undone = False

    def undo(self) -> None:
        global _active_patches
        with _lock:
            if self._undone:
                return
            self._undone = True
            _active_patches -= 1
            if _active_patches == 0:
                _rebind(_replacements(to_bigmodel=False))
                dispatch.check_device_map = utils.check_device_map

    def __enter__(self) -> AcceleratePatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def patch_accelerate() -> AcceleratePatch:
    """Makes accelerate's big-modeling functions and hooks, as transformers, diffusers, peft
    and sentence-transformers reach them, run on bigmodel (see the module docstring).

    Returns a handle whose ``undo()`` restores accelerate; it is also a context manager.

    Raises:
        ImportError: accelerate is not installed (those libraries only take their
            big-model paths when it is).
    """
    global _active_patches
    try:
        for module_name in REPLACED:
            import_module(module_name)
    except ImportError as error:
        raise ImportError(
            "bigmodel.patch_accelerate() needs accelerate installed: transformers, diffusers "
            "and peft only offer device maps and offloading when it is (pip install accelerate)."
        ) from error
    with _lock:
        if _active_patches == 0:
            _rebind(_replacements(to_bigmodel=True))
            dispatch.check_device_map = _check_device_map_as_accelerate_holds_it
        _active_patches += 1
    return AcceleratePatch()


def is_patched() -> bool:
    """True while a `patch_accelerate` handle is not undone."""
    return _active_patches > 0


_originals: dict[tuple[str, str], object] = {}


def _replacements(to_bigmodel: bool) -> dict[int, tuple[object, object]]:
    """id(object to replace) -> (that object, its replacement), in the asked direction."""
    pairs = {}
    for module_name, names in REPLACED.items():
        accelerate_module = sys.modules[module_name]
        for name, bigmodel_module in names.items():
            # Read accelerate's object once, while it is still accelerate's.
            original = _originals.setdefault((module_name, name), getattr(accelerate_module, name))
            ours = _bigmodel_object(name, bigmodel_module)
            old, new = (original, ours) if to_bigmodel else (ours, original)
            pairs[id(old)] = (old, new)
    return pairs


def _bigmodel_object(name: str, module: ModuleType) -> object:
    if name == "get_max_memory":
        return get_max_memory_in_place
    return getattr(module, name)


def _rebind(replacements: Mapping[int, tuple[object, object]]) -> None:
    """Replaces, in every imported module of `CLIENT_PACKAGES`, each global that is one of
    the objects to replace (by identity, whatever name it was bound under)."""
    for module in list(sys.modules.values()):
        if not _is_client_module(module):
            continue
        namespace = vars(module)
        for attribute, value in list(namespace.items()):
            pair = replacements.get(id(value))
            if pair is not None and pair[0] is value:
                namespace[attribute] = pair[1]


def _is_client_module(module: object) -> bool:
    name = getattr(module, "__name__", None)
    if not isinstance(module, ModuleType) or not isinstance(name, str):
        return False
    return name.split(".", 1)[0] in CLIENT_PACKAGES
