"""Per-device memory budgets for planning: `get_max_memory` (what each device may hold) and
`get_balanced_memory` (budgets that spread a model evenly over the GPUs).

Not to be confused with `bigmodel.budget`, the RAM budget of the disk store's cache.
Differences from accelerate, all fixes of crashes or surprises: `get_max_memory` never
modifies the caller's dict, and `get_balanced_memory` accepts a ``"disk"`` budget and GPU ids
that do not start at 0 or have gaps (see `get_balanced_memory`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import psutil
import torch
from torch import nn

from bigmodel.planning.module_sizes import (
    DeviceKey,
    DtypeLike,
    ModelScan,
    Size,
    class_names,
    get_module_leaves,
)
from bigmodel.sizes import convert_file_size_to_int

# The name of the module these functions were first defined in (users may configure it).
logger = logging.getLogger("bigmodel.memory")

# The keys a memory budget may have besides accelerator indices, in the order they are used.
_NAMED_DEVICES = ("mps", "cpu", "disk")


def get_max_memory(
    max_memory: Mapping[DeviceKey, int | str] | None = None,
) -> dict[DeviceKey, Size]:
    """The memory budget of each device, in bytes, as a new dict.

    Args:
        max_memory: ``{device: budget}`` with ints (accelerator indices), ``"mps"``, ``"cpu"``
            and ``"disk"`` as keys and bytes or size strings as values; ``None`` measures the
            free memory of every CUDA device and the available RAM (``"cpu"``, or ``"mps"`` on
            Apple silicon; no ``"cpu"`` budget next to an integrated GPU that shares RAM).

    Returns the budgets ordered: accelerator indices ascending, then mps, cpu, disk. The
    caller's dict is left untouched.

    Raises:
        ValueError: an unknown key (such as ``"cuda:0"``) or an invalid size string.
    """
    if max_memory is None:
        return _measure_free_memory()
    budgets = {
        key: convert_file_size_to_int(value) if isinstance(value, str) else value
        for key, value in max_memory.items()
    }
    accelerators = sorted(key for key in budgets if isinstance(key, int))
    device_count = torch.cuda.device_count()
    for index in accelerators:
        if index >= device_count or index < 0:
            available = list(range(device_count))
            logger.warning(f"Device {index} is not available, available devices are {available}")
    ordered_keys = accelerators + [key for key in _NAMED_DEVICES if key in budgets]
    for key in budgets:
        if key not in ordered_keys:
            raise ValueError(
                f"Device {key} is not recognized, available devices are integers(for GPU/XPU), "
                "'mps', 'cpu' and 'disk'"
            )
    return {key: budgets[key] for key in ordered_keys}


def _measure_free_memory() -> dict[DeviceKey, Size]:
    budgets: dict[DeviceKey, Size] = {}
    shares_host_ram = False
    for index in range(torch.cuda.device_count()):
        try:
            torch.tensor([0], device=index)  # creates the context so that the reading is right
            budgets[index] = torch.cuda.mem_get_info(index)[0]
            properties = torch.cuda.get_device_properties(index)
        except RuntimeError:
            logger.info(
                f"Device {index} seems unavailable, Proceeding to check subsequent devices."
            )
            continue
        shares_host_ram = shares_host_ram or getattr(properties, "is_integrated", False)
    available_ram = psutil.virtual_memory().available
    if torch.backends.mps.is_available():
        budgets["mps"] = available_ram
    elif not shares_host_ram:
        # An integrated GPU's memory *is* the RAM: a separate CPU budget would count it twice.
        budgets["cpu"] = available_ram
    return budgets


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[DeviceKey, int | str] | None = None,
    no_split_module_classes: str | Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[DeviceKey, Size]:
    """Budgets that spread ``model`` evenly over the GPUs, for `infer_auto_device_map`.

    Every GPU with memory except the last is capped at ``total / n_gpus`` plus a margin of
    1.25 x (largest no-split block or mean size of the innermost modules); the last GPU keeps
    its full budget; CPU and disk budgets are unchanged. With one GPU and ``max_memory=None``
    the GPU budget is 90% of its free memory. ``low_zero`` puts as little as possible on the
    first GPU (useful when it also runs ``generate``) and spreads the model over the others.

    Unlike accelerate, a ``"disk"`` budget is accepted, and GPU ids need not be 0..n-1:
    the GPUs with memory, in id order, are what is balanced, and with ``low_zero`` the first
    of them plays the part of GPU 0 (accelerate raises KeyError, or sums the wrong GPUs).
    """
    return balanced_memory(
        lambda: ModelScan(model, dtype, special_dtypes),
        max_memory,
        no_split_module_classes,
        low_zero,
    )


def balanced_memory(
    scan: Callable[[], ModelScan],
    max_memory: Mapping[DeviceKey, int | str] | None,
    no_split_module_classes: str | Iterable[str] | None,
    low_zero: bool,
) -> dict[DeviceKey, Size]:
    """`get_balanced_memory` of the model ``scan()`` walks (called only when there are GPUs
    to balance: a caller that plans too hands over the walk it plans with)."""
    measured = max_memory is None
    budgets = get_max_memory(max_memory)
    gpus = sorted(key for key, budget in budgets.items() if isinstance(key, int) and budget > 0)
    n_devices = len(gpus) + int(torch.backends.mps.is_available() and budgets.get("mps", 0) > 0)
    if n_devices == 0:
        return budgets
    if n_devices == 1:
        low_zero = False  # nothing to spread over
        if measured:
            _keep_tenth_free(budgets)
    model_scan = scan()
    module_sizes = model_scan.module_sizes()
    total = module_sizes[""]
    per_gpu = total // (n_devices - 1 if low_zero else n_devices)
    per_gpu += _balancing_margin(model_scan, module_sizes, class_names(no_split_module_classes))
    for index in gpus[:-1]:
        if not (low_zero and index == gpus[0]):
            budgets[index] = min(per_gpu, budgets[index])
    if low_zero:
        needed_on_first = max(0, total - sum(budgets[index] for index in gpus[1:]))
        budgets[gpus[0]] = min(needed_on_first, budgets[gpus[0]])
    return budgets


def _keep_tenth_free(budgets: dict[DeviceKey, Size]) -> None:
    """Uses 90% of the first GPU's measured free memory, leaving room for activations."""
    first_gpu = next((key for key in budgets if isinstance(key, int)), None)
    if first_gpu is None:
        return
    budgets[first_gpu] *= 0.9
    logger.info(
        f"We will use 90% of the memory on device {first_gpu} for storing the model, and 10% for "
        "the buffer to avoid OOM. You can set `max_memory` in to a higher value to use more "
        "memory (at your own risk)."
    )


def _balancing_margin(
    scan: ModelScan, module_sizes: Mapping[str, Size], no_split: list[str]
) -> int:
    """1.25 x max(largest no-split block, mean size of the innermost modules), in bytes.

    Without the margin each GPU would take slightly fewer layers than its share and the last
    layers would spill to CPU.
    """
    largest_block = _first_no_split_block_size(scan, module_sizes, no_split)
    # The leaves of the size table are tensors; once they are removed, its leaves are the
    # innermost modules.
    tensor_names = set(get_module_leaves(module_sizes))
    module_only = {name: size for name, size in module_sizes.items() if name not in tensor_names}
    innermost = get_module_leaves(module_only)
    mean_innermost = int(sum([module_only[name] for name in innermost]) / max(len(innermost), 1))
    return int(1.25 * max(largest_block, mean_innermost))


def _first_no_split_block_size(
    scan: ModelScan, module_sizes: Mapping[str, Size], no_split: list[str]
) -> Size:
    """The largest of the sizes of the first instance (in size-table order) of each class."""
    if not no_split:
        return 0
    wanted = set(no_split)
    modules = dict(scan.paths)  # every name of every module
    first_sizes: dict[str, Size] = {}
    for name, size in module_sizes.items():
        module = modules.get(name) if name else None
        class_name = type(module).__name__
        if module is not None and class_name in wanted and class_name not in first_sizes:
            first_sizes[class_name] = size
            if len(first_sizes) == len(wanted):
                break
    return max(first_sizes.values(), default=0)
