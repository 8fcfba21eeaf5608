"""Sizes and budgets (spec sections 2, 5.8-5.11, 5.19), with accelerate's test values."""

from __future__ import annotations

import psutil
import pytest
import torch
from _models import ModelForTest
from accelerate.utils import modeling as upstream
from torch import nn

from bigmodel.planning import budgets as memory
from bigmodel.utils import (
    calculate_maximum_sizes,
    compute_module_sizes,
    compute_module_total_buffer_size,
    convert_file_size_to_int,
    dtype_byte_size,
    get_balanced_memory,
    get_max_layer_size,
    get_max_memory,
    get_module_leaves,
)

# --------------------------------------------------------------------------------------------
# convert_file_size_to_int / dtype_byte_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("1MiB", 2**20),
        ("1.5GiB", 3 * 2**29),
        ("10gib", 10 * 2**30),
        ("2KIB", 2048),
        ("5GB", 5 * 10**9),
        (" 10 MB", 10**7),
        ("10KB", 10**4),
        ("10Gb", 1_250_000_000),  # a trailing lowercase "b" means bits
        ("10gb", 1_250_000_000),
        ("10kb", 1250),
    ],
)
def test_convert_file_size_to_int(size: int | str, expected: int) -> None:
    assert convert_file_size_to_int(size) == expected == upstream.convert_file_size_to_int(size)


@pytest.mark.parametrize("size", ["10TB", "1024", "5k0MB", "5MBB", "-1GB", -1, "nanGB"])
def test_convert_file_size_to_int_rejects(size: int | str) -> None:
    with pytest.raises(ValueError, match=f"`size` {size} is not in a valid format"):
        convert_file_size_to_int(size)


def test_convert_file_size_to_int_refuses_floats_as_accelerate() -> None:
    with pytest.raises(AttributeError):
        convert_file_size_to_int(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float32, 4),
        (torch.float16, 2),
        (torch.bfloat16, 2),
        (torch.int64, 8),
        (torch.uint8, 1),
        (torch.bool, 0.125),
        (torch.complex64, 8),
        (torch.float8_e4m3fn, 1),
        (torch.float8_e5m2, 1),
    ],
)
def test_dtype_byte_size(dtype: torch.dtype, expected: float) -> None:
    assert dtype_byte_size(dtype) == expected == upstream.dtype_byte_size(dtype)


def test_dtype_byte_size_of_accelerate_custom_dtypes() -> None:
    from accelerate.utils.dataclasses import CustomDtype

    for custom in CustomDtype:
        assert dtype_byte_size(custom) == upstream.dtype_byte_size(custom)


def test_dtype_byte_size_rejects_a_dtype_without_width() -> None:
    with pytest.raises(ValueError, match="is not a valid dtype"):
        dtype_byte_size("torch.weird")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# compute_module_sizes and friends


def test_compute_module_sizes_of_model_for_test() -> None:
    sizes = compute_module_sizes(ModelForTest())
    assert sizes[""] == 236
    assert (sizes["linear1"], sizes["batchnorm"], sizes["linear2"]) == (64, 72, 100)
    assert sizes["batchnorm.num_batches_tracked"] == 8
    assert list(sizes.items()) == list(upstream.compute_module_sizes(ModelForTest()).items())
    assert sizes["not.a.module"] == 0  # a defaultdict, as accelerate's


def test_half_model_sizes_halve_except_integer_buffers() -> None:
    sizes = compute_module_sizes(ModelForTest().half())
    assert (sizes[""], sizes["linear1"], sizes["batchnorm"], sizes["linear2"]) == (122, 32, 40, 50)


def test_target_dtype_never_increases_a_size() -> None:
    half = ModelForTest().half()
    assert compute_module_sizes(half, dtype=torch.float64)[""] == 122
    assert compute_module_sizes(ModelForTest(), dtype="float16")[""] == 122
    # 57 float elements at 1 byte, plus the int64 counter that is never cast.
    assert compute_module_sizes(ModelForTest(), dtype="torch.int8")[""] == 57 + 8


def test_special_dtypes_win_over_dtype() -> None:
    special = {"linear2.weight": "torch.float64", "linear1.weight": torch.int8}
    sizes = compute_module_sizes(ModelForTest(), dtype=torch.float16, special_dtypes=special)
    assert sizes["linear2.weight"] == 20 * 8
    assert sizes["linear1.weight"] == 12
    assert list(sizes.items()) == list(
        upstream.compute_module_sizes(ModelForTest(), torch.float16, special).items()
    )


def test_bool_tensors_count_an_eighth_of_a_byte() -> None:
    module = nn.Module()
    module.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
    assert compute_module_sizes(module)[""] == 0.375


def test_buffer_sizes() -> None:
    assert compute_module_sizes(ModelForTest(), buffers_only=True)["batchnorm"] == 40
    assert compute_module_total_buffer_size(ModelForTest()) == 40
    assert compute_module_total_buffer_size(ModelForTest().half()) == 24
    assert compute_module_total_buffer_size(nn.Linear(2, 2)) == 0


def test_sizes_work_on_meta_models() -> None:
    with torch.device("meta"):
        model = ModelForTest()
    assert compute_module_sizes(model)[""] == 236


def test_get_max_layer_size() -> None:
    model = nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest())
    sizes = compute_module_sizes(model)
    layers = list(model.named_children())
    assert get_max_layer_size(layers, sizes, []) == (100, ["0.linear2", "1.linear2", "2.linear2"])
    assert get_max_layer_size(layers, sizes, ["ModelForTest"]) == (236, ["0", "1", "2"])


def test_calculate_maximum_sizes_uses_no_split_modules_attribute() -> None:
    model = nn.Sequential(ModelForTest(), ModelForTest())
    assert calculate_maximum_sizes(model) == (472, (100, ["0.linear2", "1.linear2"]))
    model._no_split_modules = ["ModelForTest"]
    assert calculate_maximum_sizes(model) == (472, (236, ["0", "1"]))


def test_get_module_leaves() -> None:
    sizes = {"": 3, "a": 2, "a.w": 2, "b": 1, "b.c": 1, "b.c.w": 1}
    assert get_module_leaves(sizes) == ["a.w", "b.c.w"] == upstream.get_module_leaves(sizes)


# --------------------------------------------------------------------------------------------
# get_max_memory


def test_get_max_memory_converts_orders_and_leaves_the_input_alone() -> None:
    budget = {"cpu": "1GB", "disk": 5, 1: "2KiB", 0: 100}
    result = get_max_memory(budget)
    assert list(result.items()) == [(0, 100), (1, 2048), ("cpu", 10**9), ("disk", 5)]
    assert budget == {"cpu": "1GB", "disk": 5, 1: "2KiB", 0: 100}  # accelerate converts in place


def test_get_max_memory_rejects_unknown_devices() -> None:
    with pytest.raises(ValueError, match="Device cuda:0 is not recognized"):
        get_max_memory({"cuda:0": 10})


def test_get_max_memory_measures_ram_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA devices: the measured keys include them")
    measured = get_max_memory()
    assert list(measured) == ["cpu"]
    assert 0 < measured["cpu"] <= psutil.virtual_memory().total


# --------------------------------------------------------------------------------------------
# get_balanced_memory (accelerate's test values)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({0: 300, 1: 300}, {0: 215, 1: 300}),
        ({0: 300, 1: 500}, {0: 215, 1: 500}),
        ({0: 200, 1: 200}, {0: 200, 1: 200}),
        ({0: 0, 1: 300, 2: 300}, {0: 0, 1: 215, 2: 300}),
        ({0: 300, "cpu": 1000}, {0: 300, "cpu": 1000}),
        ({0: 0, "cpu": 100}, {0: 0, "cpu": 100}),
        ({0: 1000, 1: 1000, 2: 1000}, {0: 175, 1: 175, 2: 1000}),
    ],
)
def test_get_balanced_memory(budget: dict, expected: dict) -> None:
    assert get_balanced_memory(ModelForTest(), dict(budget)) == expected
    assert expected == upstream.get_balanced_memory(ModelForTest(), dict(budget))


def test_get_balanced_memory_low_zero() -> None:
    balanced = get_balanced_memory(ModelForTest(), {0: 1000, 1: 1000, 2: 1000}, low_zero=True)
    assert balanced == {0: 0, 1: 215, 2: 1000}


def test_get_balanced_memory_no_split_block_sets_the_margin() -> None:
    model = nn.Sequential(ModelForTest(), ModelForTest())
    budget = {0: 1000, 1: 1000}
    balanced = get_balanced_memory(model, dict(budget), no_split_module_classes="ModelForTest")
    assert balanced == {0: 236 + int(1.25 * 236), 1: 1000}
    assert balanced == upstream.get_balanced_memory(model, dict(budget), ["ModelForTest"])


def test_get_balanced_memory_keeps_a_tenth_of_a_measured_gpu_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def measured(budget: dict | None = None) -> dict:
        return {0: 1000, "cpu": 5000} if budget is None else dict(budget)

    monkeypatch.setattr(memory, "get_max_memory", measured)
    monkeypatch.setattr(upstream, "get_max_memory", measured)
    assert get_balanced_memory(ModelForTest()) == {0: 900.0, "cpu": 5000}
    assert upstream.get_balanced_memory(ModelForTest()) == {0: 900.0, "cpu": 5000}
    assert get_balanced_memory(ModelForTest(), {0: 1000, "cpu": 5000}) == {0: 1000, "cpu": 5000}


def test_get_balanced_memory_accepts_disk_and_gpu_ids_with_gaps() -> None:
    assert get_balanced_memory(ModelForTest(), {0: 300, 1: 300, "disk": 10}) == {
        0: 215,
        1: 300,
        "disk": 10,
    }
    # GPUs 1-3 balanced as accelerate balances GPUs 0-2 (where it raises KeyError).
    balanced = get_balanced_memory(ModelForTest(), {3: 1000, 1: 1000, 2: 1000}, low_zero=True)
    assert balanced == {1: 0, 2: 215, 3: 1000}
