"""`bigmodel.patch_accelerate`: which bindings it changes, and that undoing it restores
accelerate everywhere (the clients' behaviour under it is tested per client)."""

from __future__ import annotations

import copy
import inspect
import sys
import types

import accelerate
import accelerate.big_modeling
import accelerate.hooks
import accelerate.utils
import accelerate.utils.modeling
import diffusers.models.modeling_utils
import diffusers.pipelines.pipeline_loading_utils
import peft.peft_model
import peft.tuners.tuners_utils
import pytest
import torch
import transformers.integrations.accelerate
import transformers.integrations.peft
from _ecosystem import offline, quiet  # noqa: F401

import bigmodel
import bigmodel.dispatch
import bigmodel.hooks
import bigmodel.utils
from bigmodel.integration import REPLACED, get_max_memory_in_place, is_patched

# (module, name it binds, bigmodel's object): names the clients imported from accelerate
# before the patch, found by reading their sources.
CLIENT_BINDINGS = [
    (transformers.integrations.accelerate, "dispatch_model", bigmodel.dispatch_model),
    (transformers.integrations.accelerate, "accelerate_max_memory", get_max_memory_in_place),
    (transformers.integrations.accelerate, "get_max_layer_size", bigmodel.utils.get_max_layer_size),
    (transformers.integrations.accelerate, "clean_device_map", bigmodel.utils.clean_device_map),
    (transformers.integrations.peft, "dispatch_model", bigmodel.dispatch_model),
    (peft.peft_model, "dispatch_model", bigmodel.dispatch_model),
    (peft.peft_model, "infer_auto_device_map", bigmodel.infer_auto_device_map),
    (peft.peft_model, "get_balanced_memory", bigmodel.utils.get_balanced_memory),
    (peft.peft_model, "AlignDevicesHook", bigmodel.hooks.AlignDevicesHook),
    (peft.peft_model, "add_hook_to_module", bigmodel.hooks.add_hook_to_module),
    (peft.peft_model, "remove_hook_from_submodules", bigmodel.hooks.remove_hook_from_submodules),
    (peft.tuners.tuners_utils, "AlignDevicesHook", bigmodel.hooks.AlignDevicesHook),
    (diffusers.models.modeling_utils, "dispatch_model", bigmodel.dispatch_model),
    (diffusers.pipelines.pipeline_loading_utils, "dispatch_model", bigmodel.dispatch_model),
    (diffusers.pipelines.pipeline_loading_utils, "get_max_memory", get_max_memory_in_place),
    (accelerate, "dispatch_model", bigmodel.dispatch_model),
    (accelerate, "cpu_offload_with_hook", bigmodel.cpu_offload_with_hook),
    (accelerate.utils, "infer_auto_device_map", bigmodel.infer_auto_device_map),
]


def _bindings() -> dict[tuple[str, str], object]:
    """Every binding the tests look at, by (module name, attribute)."""
    found = {(m.__name__, name): getattr(m, name) for m, name, _ in CLIENT_BINDINGS}
    for module_name, names in REPLACED.items():
        for name in names:
            found[(module_name, name)] = getattr(sys.modules[module_name], name)
    return found


def test_patch_rebinds_accelerates_names_and_the_clients_copies_and_undo_restores_them():
    before = _bindings()
    with bigmodel.patch_accelerate():
        assert is_patched()
        for module, name, ours in CLIENT_BINDINGS:
            assert getattr(module, name) is ours, f"{module.__name__}.{name}"
        for module_name, names in REPLACED.items():
            for name, bigmodel_module in names.items():
                expected = bigmodel_module.__dict__[name]
                if name == "get_max_memory":
                    expected = get_max_memory_in_place
                assert getattr(sys.modules[module_name], name) is expected, name
        # Untouched: general tensor utilities, whose accelerate versions handle the clients'
        # quantized parameter classes.
        assert accelerate.utils.set_module_tensor_to_device.__module__.startswith("accelerate")
    assert not is_patched()
    after = _bindings()
    assert {key: id(value) for key, value in after.items()} == {
        key: id(value) for key, value in before.items()
    }


def test_a_client_module_imported_while_patched_gets_bigmodel_and_is_restored_by_undo():
    late = types.ModuleType("transformers._bigmodel_test_late_import")
    sys.modules[late.__name__] = late
    try:
        with bigmodel.patch_accelerate():
            exec("from accelerate import dispatch_model", late.__dict__)
            assert late.dispatch_model is bigmodel.dispatch_model
        assert late.dispatch_model is accelerate.big_modeling.dispatch_model
        assert late.dispatch_model.__module__ == "accelerate.big_modeling"
    finally:
        del sys.modules[late.__name__]


def test_patches_nest_and_undo_twice_does_nothing():
    original = accelerate.dispatch_model
    outer = bigmodel.patch_accelerate()
    inner = bigmodel.patch_accelerate()
    inner.undo()
    inner.undo()
    assert accelerate.dispatch_model is bigmodel.dispatch_model  # the outer patch holds
    outer.undo()
    assert accelerate.dispatch_model is original
    assert bigmodel.dispatch.check_device_map is bigmodel.utils.check_device_map


def test_patched_callables_take_accelerates_parameters():
    # transformers and peft inspect them (`"offload_index" in signature(dispatch_model)`).
    originals = {
        (module_name, name): getattr(sys.modules[module_name], name)
        for module_name, names in REPLACED.items()
        for name in names
    }
    with bigmodel.patch_accelerate():
        for (module_name, name), original in originals.items():
            patched = getattr(sys.modules[module_name], name)
            if not callable(original) or inspect.isclass(original):
                continue
            theirs = set(inspect.signature(original).parameters)
            ours = set(inspect.signature(patched).parameters)
            assert theirs <= ours, f"{module_name}.{name} lacks {theirs - ours}"


def test_get_max_memory_converts_the_callers_dict_in_place_only_under_accelerates_name():
    budgets = {"cpu": "60MB", "disk": "1GiB"}
    expected = accelerate.utils.get_max_memory(copy.deepcopy(budgets))
    untouched = dict(budgets)
    assert bigmodel.utils.get_max_memory(untouched) == expected
    assert untouched == budgets  # bigmodel's own function leaves the caller's dict alone
    with bigmodel.patch_accelerate():
        assert accelerate.utils.get_max_memory(budgets) == expected
    assert budgets == {"cpu": 60_000_000, "disk": 2**30}  # as accelerate does


def test_patch_needs_accelerate(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate.hooks", None)  # import fails
    with pytest.raises(ImportError, match="needs accelerate installed"):
        bigmodel.patch_accelerate()
    assert not is_patched()


def test_a_dispatch_while_patched_checks_the_device_map():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with (
        bigmodel.patch_accelerate(),
        pytest.raises(ValueError, match="does not give any device for the following parameters"),
    ):
        accelerate.dispatch_model(model, {"0": "cpu"})
