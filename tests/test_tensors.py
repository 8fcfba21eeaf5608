"""Tensor helpers: listing, moving one tensor (spec 5.1-5.3, 5.19), against accelerate."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import modeling as upstream
from torch import nn

from bigmodel import tensors
from bigmodel.tensors import (
    check_device_same,
    get_non_persistent_buffers,
    id_tensor_storage,
    named_module_tensors,
    set_module_tensor_to_device,
)


class ModuleWithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.linear.register_buffer("inner_scratch", torch.zeros(1), persistent=False)


class MarkedParameter(nn.Parameter):
    """A Parameter subclass: moving a tensor must keep the class."""


# --------------------------------------------------------------------------------------------
# named_module_tensors / get_non_persistent_buffers


def test_named_module_tensors_lists_parameters_then_buffers() -> None:
    names = [name for name, _ in named_module_tensors(nn.BatchNorm1d(3))]
    assert names == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def test_named_module_tensors_is_direct_unless_recursing() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    assert list(named_module_tensors(model)) == []
    assert [name for name, _ in named_module_tensors(model, recurse=True)] == ["0.weight", "0.bias"]


def test_named_module_tensors_filters_non_persistent_buffers_on_request() -> None:
    module = ModuleWithBuffers()
    all_names = [name for name, _ in named_module_tensors(module)]
    persistent = [name for name, _ in named_module_tensors(module, remove_non_persistent=True)]
    without_buffers = [name for name, _ in named_module_tensors(module, include_buffers=False)]
    assert all_names == ["kept", "scratch"]
    assert persistent == ["kept"]
    assert without_buffers == []


def test_named_module_tensors_lists_a_tied_parameter_once() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight
    names = [name for name, _ in named_module_tensors(model, recurse=True)]
    assert names == ["0.weight", "0.bias", "1.bias"]


def test_get_non_persistent_buffers_returns_a_new_set() -> None:
    module = ModuleWithBuffers()
    found = get_non_persistent_buffers(module)
    assert found == {"scratch"}
    assert found is not module._non_persistent_buffers_set
    found.add("intruder")
    assert module._non_persistent_buffers_set == {"scratch"}


def test_get_non_persistent_buffers_recursive_names() -> None:
    module = ModuleWithBuffers()
    assert get_non_persistent_buffers(module, recurse=True) == {"scratch", "inner_scratch"}
    # As accelerate: the module's own bare names, plus "prefix.name" for every module (the
    # root's prefix being "", its buffers also appear as ".scratch").
    with_prefixes = get_non_persistent_buffers(module, recurse=True, fqns=True)
    assert with_prefixes == {"scratch", ".scratch", "linear.inner_scratch"}
    assert with_prefixes == upstream.get_non_persistent_buffers(module, recurse=True, fqns=True)


# --------------------------------------------------------------------------------------------
# set_module_tensor_to_device


def test_value_is_cast_to_the_existing_dtype_without_dtype() -> None:
    module = nn.Linear(3, 4)
    value = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    set_module_tensor_to_device(module, "weight", "cpu", value=value)
    assert module.weight.dtype == torch.float32
    assert torch.equal(module.weight.data, value.float())
    assert isinstance(module.weight, nn.Parameter) and module.weight.requires_grad


def test_dtype_applies_to_a_float_value_but_not_to_an_integer_one() -> None:
    module = nn.BatchNorm1d(4)
    set_module_tensor_to_device(module, "weight", "cpu", value=torch.ones(4), dtype=torch.float16)
    set_module_tensor_to_device(
        module, "num_batches_tracked", "cpu", value=torch.tensor(5), dtype=torch.float16
    )
    assert module.weight.dtype == torch.float16
    assert module.num_batches_tracked.dtype == torch.int64
    assert module.num_batches_tracked.item() == 5


def test_moving_to_meta_with_dtype_rewraps_the_parameter() -> None:
    module = nn.Linear(3, 4)
    module.weight.requires_grad_(False)
    set_module_tensor_to_device(module, "weight", "meta", dtype=torch.float16)
    assert module.weight.device.type == "meta"
    assert module.weight.dtype == torch.float16
    assert type(module.weight) is nn.Parameter and not module.weight.requires_grad


def test_dtype_without_value_is_ignored_off_meta() -> None:
    module = nn.Linear(3, 4)
    set_module_tensor_to_device(module, "weight", "cpu", dtype=torch.float16)
    assert module.weight.dtype == torch.float32


def test_an_unchanged_parameter_keeps_its_object() -> None:
    module = nn.Linear(3, 4)
    before = module.weight
    set_module_tensor_to_device(module, "weight", "cpu")
    assert module.weight is before


def test_parameter_class_and_flags_are_kept() -> None:
    module = nn.Linear(3, 4)
    module.weight = MarkedParameter(torch.zeros(4, 3), requires_grad=False)
    module.weight._is_hf_initialized = True
    set_module_tensor_to_device(module, "weight", "cpu", value=torch.ones(4, 3))
    assert type(module.weight) is MarkedParameter
    assert not module.weight.requires_grad
    assert module.weight._is_hf_initialized is True
    assert torch.equal(module.weight.data, torch.ones(4, 3))


def test_dotted_names_and_buffer_persistence() -> None:
    model = nn.Sequential(ModuleWithBuffers())
    set_module_tensor_to_device(model, "0.scratch", "meta")
    set_module_tensor_to_device(model, "0.linear.bias", "meta")
    assert model[0].scratch.device.type == "meta"
    assert model[0].linear.bias.device.type == "meta"
    assert "0.scratch" not in model.state_dict()  # still non-persistent


def test_errors_name_the_tensor() -> None:
    module = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="does not have a parameter or a buffer named nope"):
        set_module_tensor_to_device(module, "nope", "cpu")
    with pytest.raises(AttributeError):
        set_module_tensor_to_device(nn.Sequential(module), "missing.weight", "cpu")
    expected = (
        'Trying to set a tensor of shape torch.Size([2, 2]) in "weight" (which has shape '
        "torch.Size([4, 3])), this looks incorrect."
    )
    with pytest.raises(ValueError) as error:
        set_module_tensor_to_device(module, "weight", "cpu", value=torch.ones(2, 2))
    assert str(error.value) == expected
    meta_module = nn.Linear(3, 4, device="meta")
    with pytest.raises(ValueError, match="weight is on the meta device, we need a `value`"):
        set_module_tensor_to_device(meta_module, "weight", "cpu")


def test_tied_params_map_reuses_and_records_copies() -> None:
    source = torch.ones(4, 3)
    first, second = nn.Linear(3, 4, device="meta"), nn.Linear(3, 4, device="meta")
    tied_params_map: dict = {source.data_ptr(): {}}
    set_module_tensor_to_device(
        first, "weight", "cpu", value=source, tied_params_map=tied_params_map
    )
    assert tied_params_map[source.data_ptr()]["cpu"] is first.weight
    set_module_tensor_to_device(
        second, "weight", "cpu", value=source, tied_params_map=tied_params_map
    )
    assert second.weight is first.weight


def test_the_cache_is_emptied_only_for_cuda_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = nn.Linear(3, 4)
    # accelerate empties the cache here (torch.device("cpu") is not the string "cpu").
    set_module_tensor_to_device(module, "weight", torch.device("cpu"), value=torch.ones(4, 3))
    set_module_tensor_to_device(module, "bias", "meta")
    assert emptied == []
    assert tensors._is_cuda(0) and tensors._is_cuda("cuda:1") and not tensors._is_cuda("cpu")


SCENARIOS = {
    "value, no dtype": dict(device="cpu", value=torch.full((4, 3), 2.0, dtype=torch.float64)),
    "value and dtype": dict(device="cpu", value=torch.full((4, 3), 2.0), dtype=torch.bfloat16),
    "to meta": dict(device="meta"),
    "to meta with dtype": dict(device="meta", dtype=torch.float16),
    "same device": dict(device="cpu"),
    "torch.device target": dict(device=torch.device("cpu"), value=torch.zeros(4, 3)),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_result_as_accelerate(scenario: str) -> None:
    results = []
    for implementation in (set_module_tensor_to_device, upstream.set_module_tensor_to_device):
        torch.manual_seed(0)
        module = nn.Linear(3, 4)
        module.weight.requires_grad_(False)
        before = module.weight
        kwargs = dict(SCENARIOS[scenario])
        implementation(module, "weight", kwargs.pop("device"), **kwargs, clear_cache=False)
        weight = module.weight
        values = None if weight.device.type == "meta" else weight.detach().clone()
        results.append(
            (type(weight), weight.dtype, weight.device, weight.requires_grad, weight is before)
        )
        results.append(values)
    assert results[0] == results[2]
    assert (results[1] is None and results[3] is None) or torch.equal(results[1], results[3])


# --------------------------------------------------------------------------------------------
# id_tensor_storage / check_device_same


def test_id_tensor_storage_identifies_views_of_one_storage() -> None:
    base = torch.zeros(4, 4)
    assert id_tensor_storage(base[1]) == id_tensor_storage(base.t()) == id_tensor_storage(base)
    assert id_tensor_storage(base) != id_tensor_storage(torch.zeros(4, 4))
    assert id_tensor_storage(base) == (torch.device("cpu"), base.data_ptr(), 64)


def test_id_tensor_storage_of_meta_tensors_is_pointer_zero() -> None:
    meta = torch.empty(3, device="meta")
    assert id_tensor_storage(meta) == (torch.device("meta"), 0, 12)


def test_check_device_same_treats_a_missing_index_as_zero() -> None:
    assert check_device_same(torch.device("cuda"), torch.device("cuda:0"))
    assert not check_device_same(torch.device("cuda:1"), torch.device("cuda"))
    assert check_device_same(torch.device("cpu"), torch.device("cpu"))
    assert not check_device_same(torch.device("cpu"), torch.device("meta"))
