"""`infer_auto_device_map`: where each part of a model goes, GPUs first, then CPU, then disk.

The planner gives the same maps as accelerate 1.15 (same keys, values and key order) in time
linear in the number of modules, where accelerate's is quadratic:

- the model is walked once (`ModelScan`): sizes, tied parameters and the module tree come
  from that walk, and every module's largest layer is computed once (`ModuleTree`);
- the waiting entries live in a linked list indexed by name (`Queue`): popping, pushing
  back, removing a tied module and splitting a module in place cost O(1) per entry;
- the room kept on the main devices for "the largest remaining layer" (`LayerReserve`)
  comes from a max-heap of the waiting modules' largest layers, where accelerate re-walks
  every waiting module after each split and filters a list of names after each placement;
- tied modules are found by walking up a name's parents in the queue index.

Differences from accelerate are listed in docs/compatibility.md (planning section): the
direct buffers of a split module stay in the map, fractional budgets work with
``fallback_allocation``, ties and doubly registered modules that make accelerate raise
IndexError are planned, and ``verbose=True`` logs at INFO instead of printing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bigmodel.budget import remember_planned_budget
from bigmodel.planning.budgets import get_max_memory
from bigmodel.planning.checks import clean_device_map
from bigmodel.planning.fallback import find_fitting_entry, limit_in_bytes, split_parents_of
from bigmodel.planning.module_sizes import DeviceKey, DtypeLike, ModelScan, Size, class_names
from bigmodel.planning.queue import LayerReserve, Queue
from bigmodel.planning.reports import (
    OFFLOADED,
    report_unused_devices,
    warn_about_offloaded_buffers,
)
from bigmodel.planning.tied_groups import TiedGroups, size_with_ties, waiting_owner
from bigmodel.planning.tree import ModuleTree
from bigmodel.tied import check_tied_parameters_in_config, tied_parameter_groups

# The name of the module the planner was first defined in: ``verbose=True`` is documented
# to log there.
logger = logging.getLogger("bigmodel.device_map")


@dataclass(frozen=True)
class Plan:
    """One planning of a model: its device map, the per-device budgets it was planned with,
    and its tied parameters (found by the same walk of the model)."""

    device_map: OrderedDict[str, DeviceKey]
    budgets: dict[DeviceKey, Size]
    tied_params: list[list[str]]


class _Planner:
    """One run of `infer_auto_device_map`: the queue, the devices, and what each holds.

    The decision steps (place, split a tied module, split, fallback, next device) are the
    methods `_treat` calls, in accelerate's order.
    """

    def __init__(
        self,
        model: nn.Module,
        scan: ModelScan,
        max_memory: Mapping[DeviceKey, int | str] | None,
        settings: PlannerSettings,
    ) -> None:
        self.max_memory = get_max_memory(max_memory)
        # "disk" is always the last tier, with unlimited room: planning never fails.
        self.devices: list[DeviceKey] = [
            *self.max_memory,
            *(["disk"] * ("disk" not in self.max_memory)),
        ]
        self.gpus = [device for device in self.devices if device not in ("cpu", "disk")]
        self.main_devices = _main_devices(self.gpus)
        self.scan, self.settings = scan, settings
        self._verbose = settings.verbose

        self.tree = ModuleTree.from_scan(scan, settings.no_split)
        self.model_has_buffers = bool(scan.buffer_bytes)
        self.tied_parameters = tied_parameter_groups(scan)
        if check_tied_parameters_in_config(model) and not self.tied_parameters:
            logger.warning(
                "The model weights are not tied. Please use the `tie_weights` method before using "
                "the `infer_auto_device` function."
            )
        self.ties = TiedGroups(self.tied_parameters)

        self.device_map: OrderedDict[str, DeviceKey] = OrderedDict()
        self.current = 0  # index in self.devices of the device being filled
        self.used: dict[DeviceKey, Size] = dict.fromkeys(self.devices, 0)
        self.offloaded_modules: dict[str, list[nn.Module]] = {device: [] for device in OFFLOADED}
        self.minimum_needed: dict[DeviceKey, Size] = {}  # devices that got nothing
        # Split modules whose direct buffers are mapped with their first placed part.
        self._unmapped_buffers: dict[str, list[str]] = {}

        self.reserve = LayerReserve(self.tree)
        top_level = self.tree.split_parts("", model) + list(model.named_buffers(recurse=False))
        self.queue = Queue(top_level, listener=self.reserve)
        # accelerate's first reserve also counts the model's own tensors as layers.
        self.reserve.recompute(
            waiting_tensors=[entry for entry in top_level if isinstance(entry[1], torch.Tensor)]
        )

    def run(self) -> OrderedDict[str, DeviceKey]:
        while self.queue:
            name, obj = self.queue.pop_front()
            self._say(f"Treating module {name}.")
            self.reserve.popped(name, obj)
            self._treat(name, obj)
        return self.device_map

    def _say(self, message: str) -> None:
        if self._verbose:
            logger.info(message)

    def _treat(self, name: str, obj: nn.Module | torch.Tensor) -> None:
        module_size = self.tree.size(name)
        tied_groups, tied_params = self.ties.crossing(name)
        if tied_groups:
            self._say(f"  Found the relevant tied param groups {tied_groups}")
            self._say(f"  So those parameters need to be taken into account {tied_params}")
        device = self.devices[self.current]
        capacity = None if device == "disk" else self.max_memory[device]
        reserved = 0
        if device in self.main_devices:
            # Keep room to bring back the largest offloaded layer when it runs.
            reserved = self.reserve.size
            capacity -= reserved
        size, tied_names = size_with_ties(
            module_size,
            tied_params,
            self.tree.sizes,
            functools.partial(waiting_owner, is_waiting=self.queue.__contains__),
        )
        used = self.used[device]
        if capacity is None or used + size <= capacity:
            self._place(name, obj, device, size, tied_names, capacity)
            return
        if tied_params and used + module_size <= capacity:
            self._say(
                f"Not enough space on {device} to put {name} and {tied_names} (space available "
                f"{capacity - used}, needed size {size})."
            )
            if self._split_a_tied_module(name, obj, tied_names):
                return
            self._say("None of the tied module can be split, going to the next device.")
        if used + module_size >= capacity and self._split(name, obj, device, capacity):
            return
        may_fall_back = self.settings.fallback_allocation and used == 0 and device != "disk"
        if may_fall_back and self._allocate_fallback(name, obj, device, size):
            return
        self._go_to_next_device(name, obj, device, size, reserved)

    def _place(
        self,
        name: str,
        obj: nn.Module | torch.Tensor,
        device: DeviceKey,
        size: Size,
        tied_names: list[str],
        capacity: Size | None,
    ) -> None:
        """Puts the entry and the modules holding its tied parameters on ``device``."""
        if self._verbose:
            what = f" and {tied_names}" if tied_names else f" (size={self.tree.size(name)})"
            room = "" if capacity is None else f" (available={capacity - self.used[device]})"
            self._say(f"Putting {name}{what}{room} on {device}.")
        self.used[device] += size
        self._map(name, device)
        for tied_name in tied_names:
            if tied_name in self.queue:
                self.queue.remove(tied_name)
            self._map(tied_name, device)
        if not self.settings.offload_buffers and isinstance(obj, nn.Module) and device in OFFLOADED:
            # Buffers of offloaded modules stay on the execution device: the warning at the
            # end needs their size (computed then, for these modules only).
            self.offloaded_modules[device].append(obj)

    def _map(self, name: str, device: DeviceKey) -> None:
        self.device_map[name] = device
        if not self._unmapped_buffers:
            return
        parts = name.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            for buffer_name in self._unmapped_buffers.pop(".".join(parts[:depth]), []):
                self.device_map[buffer_name] = device

    def _note_split(self, name: str, module: nn.Module) -> None:
        """Remembers the direct buffers of a module that is being split (see `_map`)."""
        buffers = [f"{name}.{buffer}" for buffer, _ in module.named_buffers(recurse=False)]
        if buffers:
            self._unmapped_buffers[name] = buffers

    def _split_a_tied_module(
        self, name: str, obj: nn.Module | torch.Tensor, tied_names: list[str]
    ) -> bool:
        """The entry fits alone but not with its tied modules: split the first splittable one."""
        for tied_name in tied_names:
            tied_module = self.queue.get(tied_name)
            if not self.tree.can_split(tied_name, tied_module):
                continue
            self._say(f"Splitting {tied_name}.")
            self._note_split(tied_name, tied_module)
            self.queue.replace(tied_name, self.tree.split_parts(tied_name, tied_module))
            self.queue.push_front([(name, obj)])
            self.reserve.recompute()
            return True
        return False

    def _split(
        self, name: str, obj: nn.Module | torch.Tensor, device: DeviceKey, capacity: Size
    ) -> bool:
        """The entry does not fit: replace it by its parameters and children, if it may be."""
        self._say(
            f"Not enough space on {device} to put {name} (space available "
            f"{capacity - self.used[device]}, module size {self.tree.size(name)})."
        )
        if not self.tree.can_split(name, obj):
            self._say("This module cannot be split, going to the next device.")
            return False
        self._say(f"Splitting {name}.")
        self._note_split(name, obj)
        self.queue.push_front(self.tree.split_parts(name, obj))
        self.reserve.recompute()
        return True

    def _allocate_fallback(
        self, name: str, obj: nn.Module | torch.Tensor, device: DeviceKey, size: Size
    ) -> bool:
        """Nothing fits on this empty device: look further down the queue for what does."""
        limit = limit_in_bytes(self.max_memory[device] - max(self.reserve.size, size))
        found = (
            None if limit is None else find_fitting_entry(self.queue, self.tree, limit, self.ties)
        )
        if found is None:
            return False
        split_parents_of(self.queue, self.tree, found, self._note_split)
        self.queue.push_front([(name, obj)])
        self.queue.move_to_front(found)
        return True

    def _go_to_next_device(
        self,
        name: str,
        obj: nn.Module | torch.Tensor,
        device: DeviceKey,
        size: Size,
        reserved: Size,
    ) -> None:
        if self.used[device] == 0:
            self.minimum_needed[device] = size + reserved
        self.used[device] += reserved
        self.current += 1
        self.queue.push_front([(name, obj)])


def _main_devices(gpus: list[DeviceKey]) -> list[DeviceKey]:
    """Devices that keep room for the largest offloaded layer (where offloaded layers run)."""
    if "mps" in gpus:
        return ["mps"]
    if gpus:
        return [gpus[0], "cpu"]
    return ["cpu"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while planning.

    Planning allocates a few small objects per module; with a large model in memory each
    automatic collection walks all its objects, and they would then take about half of the
    planning time on a 40k-module model. Planning creates no reference cycles to reclaim.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceKey, int | str] | None = None,
    no_split_module_classes: str | Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> OrderedDict[str, DeviceKey]:
    """Plans where each part of ``model`` goes: GPUs first, then CPU, then disk.

    Modules are taken in order and put on the current device while they fit; one that does
    not fit is split into its parameters and children (unless its class is in
    ``no_split_module_classes``), or the next device is used. The first GPU and the CPU keep
    room for the largest layer that remains, so that an offloaded layer can be brought back
    to run. Tied parameters are placed together. Works on meta models (sizes only).

    Args:
        model: the model to plan.
        max_memory: budget per device (``{0: "10GiB", "cpu": "30GB"}``); None measures the
            free memory. Without a ``"cpu"`` key nothing goes to the CPU; ``"disk"`` is
            always the unlimited last tier.
        no_split_module_classes: class names never split across devices (blocks with
            residual connections).
        dtype: dtype the weights will be loaded in (never makes a tensor bigger).
        special_dtypes: per-tensor dtypes, winning over ``dtype``.
        verbose: log each decision at INFO level on the ``bigmodel.device_map`` logger.
        clean_result: merge the entries of a module that all go to one device.
        offload_buffers: buffers of CPU/disk modules are offloaded too (no warning about them).
        fallback_allocation: when nothing fits on an empty device, look further down for a
            module that does instead of skipping the device.

    Returns an OrderedDict ``{module or tensor name: device}`` in placement order.
    """
    with collector_paused():
        scan = ModelScan(model, dtype, special_dtypes)
    settings = PlannerSettings(
        class_names(no_split_module_classes), offload_buffers, fallback_allocation, verbose
    )
    return plan_device_map(model, scan, max_memory, settings, clean_result).device_map


@dataclass(frozen=True)
class PlannerSettings:
    """The options of `infer_auto_device_map` that steer the planner (see there)."""

    no_split: list[str]
    offload_buffers: bool = False
    fallback_allocation: bool = False
    verbose: bool = False


def plan_device_map(
    model: nn.Module,
    scan: ModelScan,
    max_memory: Mapping[DeviceKey, int | str] | None,
    settings: PlannerSettings,
    clean_result: bool = True,
) -> Plan:
    """`infer_auto_device_map` of ``model`` from ``scan``, its walk with the dtypes to plan
    for; gives also the budgets and the tied parameters it planned with."""
    with collector_paused():
        planner = _Planner(model, scan, max_memory, settings)
        device_map = planner.run()
        remember_planned_budget(model, planner.max_memory)
        if clean_result:
            device_map = clean_device_map(device_map)
    warn_about_offloaded_buffers(planner)
    report_unused_devices(planner.minimum_needed)
    return Plan(device_map, planner.max_memory, planner.tied_parameters)
