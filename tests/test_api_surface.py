"""Every name accelerate exports at the promised locations exists in bigmodel at the matching
location, with the same parameters (names, kinds, defaults), so switching is a change of import.

Locations (spec, "Public import locations") and their bigmodel counterparts:
``accelerate`` and ``accelerate.big_modeling`` -> ``bigmodel``; ``accelerate.hooks`` ->
``bigmodel.hooks``; ``accelerate.utils`` and ``accelerate.utils.modeling`` -> ``bigmodel.utils``;
``accelerate.utils.offload`` names -> ``bigmodel.utils`` and ``bigmodel.offload``.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

BIG_MODELING = [
    "init_empty_weights",
    "init_on_device",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "load_checkpoint_and_dispatch",
]
HOOKS = [
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
]
UTILS = [
    "align_module_device",
    "calculate_maximum_sizes",
    "check_device_map",
    "check_tied_parameters_in_config",
    "check_tied_parameters_on_same_device",
    "compute_module_sizes",
    "convert_file_size_to_int",
    "dtype_byte_size",
    "find_tied_parameters",
    "get_balanced_memory",
    "get_max_layer_size",
    "get_max_memory",
    "has_offloaded_params",
    "id_tensor_storage",
    "infer_auto_device_map",
    "load_checkpoint_in_model",
    "load_offloaded_weights",
    "load_state_dict",
    "named_module_tensors",
    "retie_parameters",
    "set_module_tensor_to_device",
    "send_to_device",
    "find_device",
]
OFFLOAD = [
    "OffloadedWeightsLoader",
    "PrefixedDataset",
    "extract_submodules_state_dict",
    "load_offloaded_weight",
    "offload_state_dict",
    "offload_weight",
    "save_offload_index",
]
MODELING_ONLY = [
    "clean_device_map",
    "compute_module_total_buffer_size",
    "get_module_size_with_ties",
    "fallback_allocate",
    "get_non_persistent_buffers",
    "get_state_dict_offloaded_model",
    "get_state_dict_from_offload",
    "get_module_leaves",
    "check_device_same",
]

# (accelerate module, bigmodel module, name)
LOCATIONS = [
    *[("accelerate", "bigmodel", n) for n in [*BIG_MODELING, "infer_auto_device_map"]],
    ("accelerate", "bigmodel", "load_checkpoint_in_model"),
    *[("accelerate.big_modeling", "bigmodel", n) for n in BIG_MODELING],
    ("accelerate.big_modeling", "bigmodel", "attach_layerwise_casting_hooks"),
    *[("accelerate.hooks", "bigmodel.hooks", n) for n in HOOKS],
    *[("accelerate.utils", "bigmodel.utils", n) for n in [*UTILS, *OFFLOAD]],
    *[("accelerate.utils.offload", "bigmodel.offload", n) for n in OFFLOAD],
    *[("accelerate.utils.modeling", "bigmodel.utils", n) for n in MODELING_ONLY],
]


def _parameters(obj) -> list[tuple[str, object, object]] | None:
    """(name, kind, default) of each parameter; None where Python cannot tell."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def _same_parameters(ours, theirs) -> bool:
    """accelerate's parameters, in order, then only bigmodel extensions that no existing call
    can reach: keyword-only parameters with defaults."""
    ours_params, theirs_params = _parameters(ours), _parameters(theirs)
    if ours_params is None or theirs_params is None:
        return ours_params == theirs_params
    head, extensions = ours_params[: len(theirs_params)], ours_params[len(theirs_params) :]
    return head == theirs_params and all(
        kind == inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty
        for _, kind, default in extensions
    )


def _public_methods(cls) -> list[str]:
    return [
        name
        for name, value in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(value)
    ]


def _lookup(module_name: str, name: str):
    return getattr(importlib.import_module(module_name), name)


@pytest.mark.parametrize(
    "accelerate_module, bigmodel_module, name",
    LOCATIONS,
    ids=[f"{a}.{n}" for a, _, n in LOCATIONS],
)
def test_name_exists_with_the_same_signature(accelerate_module, bigmodel_module, name):
    theirs = _lookup(accelerate_module, name)
    ours = getattr(importlib.import_module(bigmodel_module), name, None)
    assert ours is not None, f"{bigmodel_module} lacks {name} (accelerate has {accelerate_module})"
    assert inspect.isclass(ours) == inspect.isclass(theirs)
    assert _same_parameters(ours, theirs), (_parameters(ours), _parameters(theirs))
    if inspect.isclass(theirs):
        for method in _public_methods(theirs):
            assert hasattr(ours, method), f"{name}.{method} is missing"
            assert _same_parameters(getattr(ours, method), getattr(theirs, method)), method


def test_top_level_names_are_listed_in_all():
    import bigmodel

    promised = {n for a, b, n in LOCATIONS if b == "bigmodel"}
    assert promised <= set(bigmodel.__all__)


@pytest.mark.parametrize("name", [*UTILS, *OFFLOAD, *MODELING_ONLY])
def test_utils_only_re_exports(name):
    """bigmodel.utils holds no logic: each name is the object of the module defining it."""
    ours = _lookup("bigmodel.utils", name)
    defining_module = importlib.import_module(ours.__module__)
    assert ours.__module__ != "bigmodel.utils"
    assert getattr(defining_module, name) is ours


def test_hooks_and_utils_are_attributes_after_a_plain_import():
    """As after ``import accelerate``; the rest of the package still loads on first use."""
    program = (
        "import sys, bigmodel\n"
        "assert 'bigmodel.planning.planner' not in sys.modules\n"
        "assert bigmodel.hooks.ModelHook.__name__ == 'ModelHook'\n"
        "assert callable(bigmodel.utils.find_tied_parameters)\n"
        "assert {'hooks', 'utils'} <= set(dir(bigmodel))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
