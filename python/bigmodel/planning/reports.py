"""What the planner tells its user besides the map: buffers of offloaded modules that may not
fit next to the weights, and devices that got nothing."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bigmodel.planning.module_sizes import DeviceKey, Size, compute_module_total_buffer_size

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
