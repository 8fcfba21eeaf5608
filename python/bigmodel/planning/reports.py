"""What the planner tells its user besides the map: buffers of offloaded modules that may not
fit next to the weights, devices that got nothing, and what a map sends to disk when there is
no folder to offload to."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from bigmodel.planning.module_sizes import (
    DeviceKey,
    Size,
    compute_module_sizes,
    compute_module_total_buffer_size,
)
from bigmodel.sizes import format_size

if TYPE_CHECKING:
    from bigmodel.planning.planner import _Planner

OFFLOADED = ("cpu", "disk")  # devices whose modules run elsewhere (buffers excepted)

logger = logging.getLogger("bigmodel.device_map")  # where the planner logs (see planner.py)


def warn_about_offloaded_buffers(planner: _Planner) -> None:
    """Warns when the buffers of CPU/disk modules fit on no GPU next to its weights."""
    if planner.settings.offload_buffers or not planner.gpus or not planner.model_has_buffers:
        return
    offloaded = sum(_buffer_size(planner, device) for device in OFFLOADED)
    if offloaded <= 0:
        return
    fits_a_gpu = any(
        budget >= offloaded + planner.used.get(device, 0)
        for device, budget in planner.max_memory.items()
        if device not in ("cpu", "disk")
    )
    if not fits_a_gpu:
        warnings.warn(
            f"Current model requires {offloaded} bytes of buffer for offloaded layers, which "
            "seems does not fit any GPU's remaining memory. If you are experiencing a OOM "
            "later, please consider using offload_buffers=True.",
            UserWarning,
            stacklevel=4,  # the caller of infer_auto_device_map
        )


def _buffer_size(planner: _Planner, device: str) -> Size:
    total: Size = 0  # summed in placement order: sizes may be fractional
    for module in planner.offloaded_modules[device]:
        # Module-relative names for special_dtypes, as accelerate does.
        total += compute_module_total_buffer_size(
            module, planner.scan.dtype, planner.scan.special_dtypes
        )
    return total


def report_unused_devices(minimum_needed: Mapping[DeviceKey, Size]) -> None:
    """Logs the devices that got nothing, and what they would have needed."""
    if not minimum_needed:
        return
    needs = "\n".join(
        f"  - {device}: {size} bytes required" for device, size in minimum_needed.items()
    )
    logger.info(
        "Based on the current allocation process, no modules could be assigned to the "
        f"following devices due to insufficient memory:\n{needs}\nThese minimum "
        "requirements are specific to this allocation attempt and may vary. Consider "
        "increasing the available memory for these devices to at least the specified "
        "minimum, or adjusting the model config."
    )


def missing_offload_folder_error(
    model: nn.Module, device_map: Mapping[str, object], dtype, budgets: Mapping | None
) -> ValueError:
    """Says which modules go to disk, their sizes, and what each device had left."""
    sizes = compute_module_sizes(model, dtype=dtype)
    disk_keys = [key for key, device in device_map.items() if device == "disk"]
    placed: dict[object, int] = {}
    for key, device in device_map.items():
        if device != "disk":
            placed[device] = placed.get(device, 0) + sizes.get(key, 0)
    lines = [
        "At least one of the model submodule will be offloaded to disk, please pass along an "
        f'`offload_folder`. {len(disk_keys)} entries of the device_map go to "disk" '
        f"({format_size(sum(sizes.get(key, 0) for key in disk_keys))}):",
        *(f"  {key}: {format_size(sizes.get(key, 0))}" for key in disk_keys),
        "What each device holds:",
    ]
    for device in dict.fromkeys([*(budgets or {}), *placed]):
        if device == "disk":
            continue
        line = f"  {device!r}: {format_size(placed.get(device, 0))} placed"
        if budgets and device in budgets:
            left = budgets[device] - placed.get(device, 0)
            line += f" of a {format_size(budgets[device])} budget ({format_size(left)} left)"
        lines.append(line)
    lines.append("Pass `offload_folder=<a directory>` or raise `max_memory`.")
    return ValueError("\n".join(lines))
