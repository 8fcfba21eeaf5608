"""infer_auto_device_map and the map checks: the worked examples of spec sections 5 and 8,
and the documented differences from accelerate."""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict

import pytest
import torch
from _models import Block, ModelForTest
from accelerate.utils import modeling as upstream
from torch import nn

from bigmodel.utils import (
    check_device_map,
    clean_device_map,
    fallback_allocate,
    get_module_size_with_ties,
    infer_auto_device_map,
)


def three_models(*names: str) -> nn.Module:
    names = names or ("0", "1", "2")
    return nn.Sequential(OrderedDict((name, ModelForTest()) for name in names))


def fallback_model() -> nn.Module:
    """module.linear1 176 bytes, module.linear2 80, module.linear3 160."""
    inner = OrderedDict(linear1=nn.Linear(10, 4), linear2=nn.Linear(4, 4), linear3=nn.Linear(4, 8))
    return nn.Sequential(OrderedDict(module=nn.Sequential(inner)))


def ours_and_upstream(model: nn.Module, **kwargs) -> tuple[list, list]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = infer_auto_device_map(model, **kwargs)
        theirs = upstream.infer_auto_device_map(model, **kwargs)
    return list(ours.items()), list(theirs.items())


# --------------------------------------------------------------------------------------------
# Worked examples of spec section 8


@pytest.mark.parametrize(
    "max_memory",
    [{0: 200, 1: 200}, {0: 200, 1: 172, 2: 200}],  # device 1 keeps no reserve: not main
)
def test_first_gpu_keeps_room_for_the_largest_layer(max_memory: dict) -> None:
    ours, theirs = ours_and_upstream(ModelForTest(), max_memory=max_memory)
    assert ours == [("linear1", 0), ("batchnorm", 1), ("linear2", 1)] == theirs


def test_the_largest_layer_may_use_the_reserve_itself() -> None:
    ours, theirs = ours_and_upstream(ModelForTest(), max_memory={"cpu": 250})
    assert ours == [("", "cpu")] == theirs


def test_tied_weights_count_once() -> None:
    model = ModelForTest()
    model.linear1.weight = nn.Parameter(torch.zeros(4, 3))
    model.linear2.weight = nn.Parameter(torch.zeros(5, 4))
    tied = ModelForTest()
    tied.linear2.weight = tied.linear1.weight  # (shapes do not matter to planning)
    ours, theirs = ours_and_upstream(tied, max_memory={0: 200, 1: 200})
    assert ours == [("", 0)] == theirs


def test_splitting_a_model_of_models() -> None:
    ours, theirs = ours_and_upstream(three_models(), max_memory={0: 500, 1: 500})
    expected = [("0", 0), ("1.linear1", 0), ("1.batchnorm", 0), ("1.linear2", 1), ("2", 1)]
    assert ours == expected == theirs
    ours, theirs = ours_and_upstream(
        three_models(), max_memory={0: 500, 1: 500}, no_split_module_classes=["ModelForTest"]
    )
    assert ours == [("0", 0), ("1", 1), ("2", 1)] == theirs


def test_tied_modules_across_layers_are_placed_together() -> None:
    model = three_models("layer1", "layer2", "layer3")
    model.layer3.linear2.weight = model.layer1.linear2.weight
    ours, theirs = ours_and_upstream(model, max_memory={0: 400, 1: 500})
    assert dict(ours) == {
        "layer1": 0,
        "layer3.linear2": 0,
        "layer2": 1,
        "layer3.linear1": 1,
        "layer3.batchnorm": 1,
    }
    assert ours == theirs  # placement order included


def test_nothing_fits_the_gpu_so_everything_goes_to_disk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="bigmodel.device_map"):
        ours, theirs = ours_and_upstream(fallback_model(), max_memory={0: 256})
    assert ours == [("", "disk")] == theirs
    message = "\n".join(record.getMessage() for record in caplog.records)
    assert "insufficient memory" in message and "  - 0: 336 bytes required" in message


def test_fallback_allocation_finds_a_module_that_fits() -> None:
    ours, theirs = ours_and_upstream(
        fallback_model(), max_memory={0: 256}, fallback_allocation=True
    )
    expected = [("module.linear2", 0), ("module.linear1", "disk"), ("module.linear3", "disk")]
    assert ours == expected == theirs


def test_fallback_allocation_accepts_fractional_budgets() -> None:
    """Documented fix: accelerate raises AttributeError on such budgets (spec quirk 17)."""
    with pytest.raises(AttributeError):
        upstream.infer_auto_device_map(
            fallback_model(), max_memory={0: 256.0}, fallback_allocation=True
        )
    planned = infer_auto_device_map(
        fallback_model(), max_memory={0: 256.0}, fallback_allocation=True
    )
    assert list(planned.items()) == [
        ("module.linear2", 0),
        ("module.linear1", "disk"),
        ("module.linear3", "disk"),
    ]


class ModelWithExtraBuffers(ModelForTest):
    def __init__(self) -> None:
        super().__init__()
        self.linear1.register_buffer("extra", torch.zeros(50))


def test_buffers_of_offloaded_modules_warn_when_no_gpu_can_hold_them() -> None:
    with pytest.warns(UserWarning, match="Current model requires .* offload_buffers=True"):
        planned = infer_auto_device_map(ModelWithExtraBuffers(), max_memory={0: 400, "cpu": "1GB"})
    assert dict(planned) == {"linear1": 0, "batchnorm": "cpu", "linear2": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all with offload_buffers=True
        infer_auto_device_map(
            ModelWithExtraBuffers(), max_memory={0: 400, "cpu": "1GB"}, offload_buffers=True
        )


def test_without_a_cpu_budget_nothing_goes_to_the_cpu() -> None:
    ours, theirs = ours_and_upstream(ModelForTest(), max_memory={0: 170})
    assert ours == [("linear1", 0), ("batchnorm", "disk"), ("linear2", "disk")] == theirs


def test_size_strings_dtype_and_placement_order() -> None:
    ours, theirs = ours_and_upstream(
        three_models(), max_memory={0: "0.25KB", 1: "1KiB"}, dtype=torch.float16
    )
    assert ours == theirs
    planned = infer_auto_device_map(three_models(), max_memory={0: 300, 1: 1000})
    assert isinstance(planned, OrderedDict)


def test_verbose_logs_each_decision_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bigmodel.device_map"):
        infer_auto_device_map(three_models(), max_memory={0: 500, 1: 500}, verbose=True)
    records = [record for record in caplog.records if record.name == "bigmodel.device_map"]
    messages = [record.getMessage() for record in records]
    assert "Treating module 0." in messages
    assert "Splitting 1." in messages
    assert "This module cannot be split, going to the next device." in messages
    assert "Putting 1.linear2 (size=100) (available=500) on 1." in messages  # 1: no reserve
    assert all(record.levelno == logging.INFO for record in records)


# --------------------------------------------------------------------------------------------
# Documented differences: buffers of split modules, ties accelerate cannot plan


def block_with_buffer() -> nn.Module:
    inner = Block({"linear1": nn.Linear(4, 4), "linear2": nn.Linear(4, 4)}, buffer_numel=4)
    return nn.Sequential(OrderedDict(block=inner, head=nn.Linear(4, 4)))


def test_split_modules_keep_their_direct_buffers_in_the_map() -> None:
    model = block_with_buffer()  # block: 2 x 80 bytes of Linear + 16 bytes of "stat"
    theirs = upstream.infer_auto_device_map(model, max_memory={0: 170, 1: 1000})
    assert "block.stat" not in theirs
    with pytest.raises(ValueError, match="block.stat"):
        check_device_map(model, theirs)
    ours = infer_auto_device_map(model, max_memory={0: 170, 1: 1000})
    assert list(ours.items()) == [
        ("block.linear1", 0),
        ("block.stat", 0),  # with the first placed part of its module
        ("block.linear2", 1),
        ("head", 1),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "block.stat" is not a module name: a warning only
        check_device_map(model, ours)


def test_a_module_registered_twice_in_one_parent_is_mapped_under_both_names() -> None:
    linear = nn.Linear(4, 4)
    model = nn.Sequential(linear, linear)
    with pytest.raises(IndexError):
        upstream.infer_auto_device_map(model, max_memory={0: 1000})
    assert infer_auto_device_map(model, max_memory={0: 1000}) == {"": 0}
    split = infer_auto_device_map(model, max_memory={0: 1, "cpu": 1000}, clean_result=False)
    assert dict(split) == {"0": "cpu", "1": "cpu"}


# --------------------------------------------------------------------------------------------
# check_device_map / clean_device_map / helpers


def test_check_device_map_warns_on_unknown_keys_and_lists_uncovered_tensors() -> None:
    model = ModelForTest()
    check_device_map(model, {"": 0})
    check_device_map(model, {"linear1": 0, "batchnorm": 0, "linear2": 1})
    with pytest.warns(UserWarning, match=r"do not match any submodules in the model: \['nope'\]"):
        check_device_map(model, {"": 0, "nope": 1})
    with pytest.raises(ValueError) as error, pytest.warns(UserWarning, match="linear2.weight"):
        check_device_map(model, {"linear1": 0, "linear2.weight": 1})
    assert str(error.value) == (
        "The device_map provided does not give any device for the following parameters: "
        "batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var, "
        "batchnorm.num_batches_tracked, linear2.bias"
    )


def test_check_device_map_prefix_needs_a_dot() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(11)])
    device_map = {str(index): 0 for index in range(11) if index != 10}
    device_map["1"] = 0
    with pytest.raises(ValueError, match="10.weight, 10.bias"):
        check_device_map(model, device_map)


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        ({"a": 0, "b": 0, "c": 0}, [("", 0)]),
        ({"a.x": 0, "a.y": 0, "b.x": 1, "b.y": 1, "c": 1}, None),
        ({"a.x": 0, "a.y": 0, "b": 1}, [("b", 1), ("a", 0)]),
        ({"a.x": 0, "a.y": 1, "b": 1}, [("a.x", 0), ("a.y", 1), ("b", 1)]),
    ],
)
def test_clean_device_map(device_map: dict, expected: list | None) -> None:
    cleaned = list(clean_device_map(dict(device_map)).items())
    assert cleaned == list(upstream.clean_device_map(dict(device_map)).items())
    if expected is not None:
        assert cleaned == expected
    else:
        assert dict(cleaned) == {"a": 0, "b": 1, "c": 1}


def test_clean_device_map_under_a_module_only() -> None:
    device_map = {"a.x": 0, "a.y": 0, "b.x": 1, "b.y": 1}
    assert list(clean_device_map(device_map, "b").items()) == [("a.x", 0), ("a.y", 0), ("b", 1)]


def test_get_module_size_with_ties() -> None:
    model = three_models()
    entries = list(model.named_children())
    sizes = upstream.compute_module_sizes(model)
    assert get_module_size_with_ties([], 7, sizes, entries) == (7, [], [])
    size, names, modules = get_module_size_with_ties(["2.linear2.weight"], 10, sizes, entries)
    assert (size, names, modules) == (10 + 236 - 80, ["2"], [model[2]])


def test_fallback_allocate_returns_the_input_when_nothing_fits() -> None:
    model = fallback_model()
    entries = list(model.named_children())
    sizes = upstream.compute_module_sizes(model)
    assert fallback_allocate(entries, sizes, 10) == (None, None, entries)
    assert fallback_allocate(entries, sizes, "not a size") == (None, None, entries)
    name, module, remaining = fallback_allocate(entries, sizes, "0.1KB")
    assert (name, module) == ("module.linear2", model.module.linear2)
    assert [entry for entry, _ in remaining] == ["module.linear1", "module.linear3"]
