"""How much RAM the store serving an offloaded model's disk weights may hold.

A budget is real memory: what the process holds plus what its reads leave in the page
cache. The CPU budget a user gives (``max_memory={"cpu": ...}``) covers both the weights the
device map keeps in RAM and the disk store's cache, so the cache gets what is left of it.
This module is the one place that decides, from the first of these that is known:

1. ``max_resident``, given explicitly (`dispatch_model`, `disk_offload`,
   `load_checkpoint_and_dispatch`): the cache's own budget, as given;
2. a CPU budget: ``max_memory["cpu"]`` given with the map, or the one
   `infer_auto_device_map` planned this model's map with (remembered per model, so the
   two-step usage "plan, then load or dispatch" keeps it); the cache gets it minus the
   weights the map keeps in RAM;
3. nothing: half the memory the machine has available now (``MemAvailable``, or what the
   process's cgroup still allows when that is less), minus the weights kept in RAM.

The budget chosen, and why, is logged at INFO level on the ``bigmodel.budget`` logger.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bigmodel.sizes import convert_file_size_to_int, format_size, parse_size
from bigmodel.tensors import owner_and_leaf

logger = logging.getLogger(__name__)

# model -> the CPU budget (bytes) its device map was planned with
_planned_cpu_budgets: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()

# Share of the available memory a store takes when no budget is given anywhere: the rest is
# left to activations, to the weights kept in RAM, and to everything else on the machine.
_SHARE_OF_AVAILABLE = 0.5


def remember_planned_budget(model: nn.Module, budgets: Mapping) -> None:
    """Records the CPU budget ``model``'s device map was planned with (``budgets`` as
    resolved by the planner), for the dispatch that follows."""
    if budgets.get("cpu") is not None:
        _planned_cpu_budgets[model] = int(budgets["cpu"])


def disk_cache_budget(
    model: nn.Module,
    device_map: Mapping[str, object],
    max_resident: int | str | None = None,
    cpu_budget: int | str | None = None,
) -> int:
    """The byte budget of the store serving ``model``'s offloaded weights (see the module
    docstring for the order in which sources are consulted)."""
    if max_resident is not None:
        budget = parse_size(max_resident, "max_resident")
        logger.info("disk store budget %s: max_resident as given", format_size(budget))
        return budget
    in_ram = bytes_kept_in_ram(model, device_map)
    if cpu_budget is None:
        cpu_budget = _planned_cpu_budgets.get(model)
        source = "the CPU budget the device map was planned with"
    else:
        source = "the CPU budget given"
    if cpu_budget is not None:
        cpu_budget = convert_file_size_to_int(cpu_budget)
    else:
        cpu_budget = int(available_memory() * _SHARE_OF_AVAILABLE)
        source = f"half the memory available on this machine ({format_size(available_memory())})"
    budget = max(cpu_budget - in_ram, 0)
    logger.info(
        "disk store budget %s: %s (%s) minus %s of weights kept in RAM",
        format_size(budget),
        source,
        format_size(cpu_budget),
        format_size(in_ram),
    )
    return budget


def bytes_kept_in_ram(model: nn.Module, device_map: Mapping[str, object]) -> int:
    """Bytes of the tensors under the entries ``device_map`` puts on "cpu" (each tensor
    once, in the dtype the model holds it in: loaded, or a placeholder of its final dtype)."""
    seen: set[int] = set()
    total = 0
    for name, device in device_map.items():
        if device != "cpu" and device != torch.device("cpu"):
            continue
        for tensor in _tensors_under(model, name):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _tensors_under(model: nn.Module, name: str) -> list[torch.Tensor]:
    try:
        module = model.get_submodule(name)
    except AttributeError:  # a single tensor's entry
        owner, leaf = owner_and_leaf(model, name)
        tensor = getattr(owner, leaf, None)
        return [tensor] if isinstance(tensor, torch.Tensor) else []
    return [*module.parameters(), *module.buffers()]


def available_memory() -> int:
    """Bytes this process can still use: ``MemAvailable``, capped by what its memory cgroup
    (a container's limit) still allows."""
    available = _meminfo_bytes("MemAvailable")
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/meminfo has no field {field!r}")


# (cgroup file system root, limit file, usage file) of cgroup v2 and of v1's memory controller
_CGROUP_V2 = ("/sys/fs/cgroup", "memory.max", "memory.current")
_CGROUP_V1 = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
# v1 reports "no limit" as a huge number
_NO_LIMIT = 1 << 60


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup; None when it has no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            root, limit_file, usage_file = _CGROUP_V2
        elif "memory" in controllers.split(","):
            root, limit_file, usage_file = _CGROUP_V1
        else:
            continue
        folder = Path(root) / group.lstrip("/")
        limit, usage = _read_number(folder / limit_file), _read_number(folder / usage_file)
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            return max(limit - usage, 0)
    return None


def _read_number(path: Path) -> int | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return None if value == "max" else int(value)
