"""The load plan: for every tensor of the model, which checkpoint tensor feeds it, where it
goes and in which dtype; and the checks of the caller's device map and of the plan, made
before anything is loaded."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bigmodel.errors import name_list
from bigmodel.loading.files import CheckpointTensor
from bigmodel.planning.checks import check_device_map, device_of
from bigmodel.tensors import offloaded_tensors

logger = logging.getLogger("bigmodel.loading")  # the logger of bigmodel.loading's modules

# How many names a mismatch message lists (checkpoints hold thousands).
_NAMES_SHOWN = 10


class CheckpointMismatchError(ValueError, RuntimeError):
    """The checkpoint's tensors do not match the model's (unexpected, missing or reshaped).

    A ``ValueError`` like accelerate's errors on the device-map path and a ``RuntimeError``
    like ``torch.nn.Module.load_state_dict(strict=True)``, so either ``except`` catches it.
    """


def _check_device_value(key: str, device) -> None:
    """Refuses device_map values that are not devices, or devices this machine lacks."""
    if isinstance(device, str) and device in ("cpu", "disk"):
        return
    try:
        parsed = None if isinstance(device, bool) else torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None:
        raise ValueError(
            f'device_map["{key}"] = {device!r} is not a device: use "cpu", "disk", an accelerator '
            'index such as 0, or a torch device such as "cuda:0".'
        )
    if parsed.type == "meta":
        raise ValueError(f'device_map["{key}"] = {device!r}: weights cannot be loaded to "meta".')
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    count = backend.device_count() if hasattr(backend, "device_count") else 0
    if (parsed.index or 0) >= count:
        raise ValueError(
            f'device_map["{key}"] = {device!r}, but this machine has {count} {parsed.type} '
            "device(s)."
        )


def check_device_map_for_loading(model: nn.Module, device_map: Mapping[str, object]) -> None:
    """Device values exist, every key names something in the model, every tensor is mapped."""
    for key, device in device_map.items():
        _check_device_value(key, device)
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    known.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    known.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    unknown = [key for key in device_map if key not in known]
    if unknown:
        raise ValueError(
            f"device_map keys {unknown} name no module, parameter or buffer of "
            f"{type(model).__name__}; keys are names from `model.named_modules()` or "
            "`model.state_dict()`."
        )
    check_device_map(model, device_map)


@dataclass(frozen=True)
class Route:
    """One model tensor: which checkpoint tensor feeds it (None: keep the model's own value),
    where it goes ("disk" or a device), and the dtype to load it in (None: the model's)."""

    source: str | None
    device: object
    dtype: torch.dtype | None


@dataclass
class LoadPlan:
    routes: dict[str, Route] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # no value in the checkpoint, kept as is
    missing_on_meta: list[str] = field(default_factory=list)  # ... and no value at all
    reshaped: list[str] = field(default_factory=list)


def _in_modules(name: str, module_names: Iterable[str]) -> bool:
    """True when ``name`` is inside one of the modules: a key equals a run of whole name
    components ("wo" matches "encoder.block.0.wo.weight", not "two.weight")."""
    dotted = f".{name}."
    return any(f".{module}." in dotted for module in module_names)


def _load_dtype(name: str, stored: torch.dtype, dtype, keep_in_fp32_modules) -> torch.dtype | None:
    if dtype is None or not stored.is_floating_point:
        return None
    if keep_in_fp32_modules and _in_modules(name, keep_in_fp32_modules):
        return torch.float32
    return dtype


def _tie_sources(tied_params: list[list[str]], catalog: Mapping) -> dict[str, str]:
    """For tied names the checkpoint lacks, a tied partner the checkpoint holds."""
    sources = {}
    for group in tied_params:
        present = [name for name in group if name in catalog]
        if present:
            sources.update({name: present[0] for name in group if name not in catalog})
    return sources


def plan_load(
    model: nn.Module,
    catalog: Mapping[str, CheckpointTensor],
    device_map: Mapping[str, object] | None,
    dtype: torch.dtype | None,
    keep_in_fp32_modules: list[str] | None,
    offload_buffers: bool,
    tied: list[list[str]],
) -> LoadPlan:
    """Routes every model state-dict tensor; records unexpected, missing and reshaped names."""
    plan = LoadPlan()
    model_tensors = model.state_dict(keep_vars=True)
    served_from_disk = {
        name for name, _ in offloaded_tensors(model, offload_buffers, True, remove_duplicate=False)
    }
    tie_sources = _tie_sources(tied, catalog)
    for name, current in model_tensors.items():
        source = name if name in catalog else tie_sources.get(name)
        if device_map is None:
            device = "cpu" if current.device.type == "meta" else current.device
        else:
            device = device_of(name, device_map)
        if device == "disk" and name not in served_from_disk:  # a buffer kept resident
            device = "cpu" if current.device.type == "meta" else current.device
        if source is None:
            missing = plan.missing_on_meta if current.device.type == "meta" else plan.missing
            missing.append(name)
            if device != "disk":
                continue
        elif catalog[source].shape != tuple(current.shape):
            plan.reshaped.append(
                f"{name}: {list(catalog[source].shape)} in {catalog[source].file}, "
                f"{list(current.shape)} in the model"
            )
        stored = catalog[source].dtype if source else current.dtype
        plan.routes[name] = Route(
            source, device, _load_dtype(name, stored, dtype, keep_in_fp32_modules)
        )
    plan.unexpected = [name for name in catalog if name not in model_tensors]
    return plan


def check_plan(plan: LoadPlan, model: nn.Module, checkpoint, strict: bool) -> None:
    """Raises on reshaped tensors, on tensors left without data, and (strict) on any key
    mismatch; warns otherwise."""
    problems = []
    if plan.reshaped:
        problems.append(f"shapes differ: {name_list(plan.reshaped, _NAMES_SHOWN)}")
    if plan.missing_on_meta:
        problems.append(
            "missing from the checkpoint while on the meta device (they would have no data): "
            f"{name_list(plan.missing_on_meta, _NAMES_SHOWN)}"
        )
    if strict and plan.missing:
        problems.append(f"missing from the checkpoint: {name_list(plan.missing, _NAMES_SHOWN)}")
    if strict and plan.unexpected:
        problems.append(
            f"in the checkpoint but not in the model: {name_list(plan.unexpected, _NAMES_SHOWN)}"
        )
    if problems:
        raise CheckpointMismatchError(
            f"Cannot load {checkpoint} into {type(model).__name__}: " + "; ".join(problems)
        )
    if plan.unexpected:
        unexpected = name_list(plan.unexpected, _NAMES_SHOWN)
        logger.warning(
            f"Some weights of the model checkpoint at {checkpoint} were not used when initializing "
            f"{type(model).__name__}: {unexpected}. This may or may not be an "
            "issue - make sure that the checkpoint does not have unnecessary parameters, or that "
            "the model definition correctly corresponds to the checkpoint."
        )
    if plan.missing:
        logger.warning(
            f"Some tensors of {type(model).__name__} are not in the checkpoint at {checkpoint} "
            f"and keep their current values: {name_list(plan.missing, _NAMES_SHOWN)}"
        )
