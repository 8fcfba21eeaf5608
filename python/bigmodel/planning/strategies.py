"""Device maps given by name: "auto", "balanced", "balanced_low_0", "sequential".

`plan_for_strategy` walks the model once: the balanced budgets, the map and the tied
parameters all come from that one `ModelScan`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from bigmodel.planning.budgets import balanced_memory, get_max_memory
from bigmodel.planning.module_sizes import DeviceKey, DtypeLike, ModelScan, class_names
from bigmodel.planning.planner import Plan, PlannerSettings, collector_paused, plan_device_map

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def plan_for_strategy(
    model: nn.Module,
    strategy: str,
    max_memory: Mapping[DeviceKey, int | str] | None,
    no_split_module_classes: list[str] | None,
    dtype: DtypeLike | None,
    offload_buffers: bool,
) -> Plan:
    """The plan of ``model`` for a named strategy, within ``max_memory``: budgets balanced
    across accelerators for all but "sequential", then `infer_auto_device_map`.
    ``no_split_module_classes`` defaults to the model's ``_no_split_modules``.

    Raises:
        ValueError: ``strategy`` is not one of `STRATEGIES`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            "If passing a string for `device_map`, please choose 'auto', 'balanced', "
            "'balanced_low_0' or 'sequential'."
        )
    if no_split_module_classes is None:
        no_split_module_classes = sorted(getattr(model, "_no_split_modules", None) or [])
    if max_memory is not None:
        max_memory = dict(max_memory)  # the budget helpers may rewrite the values in place
    with collector_paused():
        scan = ModelScan(model, dtype)
    if strategy == "sequential":
        budgets = get_max_memory(max_memory)
    else:
        low_zero = strategy == "balanced_low_0"
        budgets = balanced_memory(lambda: scan, max_memory, no_split_module_classes, low_zero)
    settings = PlannerSettings(class_names(no_split_module_classes), offload_buffers)
    return plan_device_map(model, scan, dict(budgets), settings)
