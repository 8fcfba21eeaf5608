"""Spreading a model over devices: `cpu_offload`, `cpu_offload_with_hook`, `disk_offload`,
`dispatch_model`.

`dispatch_model` first decides everything serving the model needs (a `_DispatchPlan`: the
execution device and offload flag of each block, the weights map of the offloaded blocks,
the tied parameters), then attaches the hooks that carry it out. Its weights on disk are
served by the store of the offload folder (see `bigmodel.offload.stores`), checked against
the model. `load_checkpoint_and_dispatch` hands over what loading already decided instead
(`LoadedForDispatch`: the map checked, the ties found, the store it committed and the key of
each name in it), so nothing is discovered or checked twice.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from bigmodel.budget import disk_cache_budget
from bigmodel.hooks import (
    AlignDevicesHook,
    CpuOffload,
    UserCpuOffloadHook,
    add_hook_to_module,
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
    share_forward_lock,
)
from bigmodel.offload import StoreWeightsMap
from bigmodel.offload.stores import (
    CommittedStore,
    check_sources,
    fetched_tensors,
    sources_in_folder,
    sources_in_index,
    tensors_under,
    tie_candidates,
)
from bigmodel.planning.checks import check_device_map
from bigmodel.prefetch import attach_prefetcher
from bigmodel.tensors import get_tensor, owner_and_leaf
from bigmodel.tied import find_tied_parameters, retie_parameters

logger = logging.getLogger(__name__)

_OFFLOADED_DEVICES = ("cpu", "disk")
Device = str | int | torch.device


# --------------------------------------------------------------------------------------
# Whole-model offload
# --------------------------------------------------------------------------------------


def cpu_offload(
    model: nn.Module,
    execution_device: torch.device | str | int | None = None,
    offload_buffers: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    preload_module_classes: list[str] | None = None,
) -> nn.Module:
    """Keeps one copy of the weights in CPU RAM and loads each module's weights onto
    ``execution_device`` only for its forward.

    Args:
        model: the model (modified in place and returned).
        execution_device: where forwards run; defaults to the first parameter's device.
        offload_buffers: offload persistent buffers too (else they live on the device).
        state_dict: the CPU copy to serve weights from; defaults to the model's own tensors
            (no copy when they are on CPU already).
        preload_module_classes: class names whose instances load their whole subtree at
            once (for modules that use submodule weights without calling the submodules).
    """
    if execution_device is None:
        execution_device = next(iter(model.parameters())).device
    if state_dict is None:
        state_dict = {name: t.to("cpu") for name, t in model.state_dict().items()}
    _offload_whole_model(
        model, execution_device, offload_buffers, state_dict, preload_module_classes
    )
    return model


def disk_offload(
    model: nn.Module,
    offload_dir: str | os.PathLike,
    execution_device: torch.device | str | int | None = None,
    offload_buffers: bool = False,
    preload_module_classes: list[str] | None = None,
    *,
    max_resident: int | str | None = None,
) -> nn.Module:
    """Serves every weight from a store in ``offload_dir``, loading each module's weights
    onto ``execution_device`` only for its forward.

    The store is reused when ``offload_dir`` holds one (or an accelerate offload folder) and
    it matches the model; otherwise the model's state dict is written there first.
    ``max_resident`` (bigmodel extension) bounds the RAM the store's cache keeps; without
    it the store takes half the memory the machine has available (see `bigmodel.budget`).
    Other arguments as in `cpu_offload`.
    """
    sources = sources_in_folder(
        offload_dir,
        fetched_tensors(model, [""], offload_buffers),
        tie_candidates(model),
        lambda: model.state_dict(keep_vars=True),
        disk_cache_budget(model, {"": "disk"}, max_resident),
    )
    if execution_device is None:
        execution_device = _first_parameter_device(model)
    weights_map = StoreWeightsMap(sources=sources)
    _offload_whole_model(
        model, execution_device, offload_buffers, weights_map, preload_module_classes
    )
    return model


def _first_parameter_device(model: nn.Module) -> torch.device:
    """accelerate's default execution device, except that a model whose weights are all on
    meta (served by the store) runs on CPU rather than producing meta outputs."""
    device = next(iter(model.parameters())).device
    return torch.device("cpu") if device.type == "meta" else device


def _offload_whole_model(model, execution_device, offload_buffers, weights_map, preload_classes):
    tied_params = find_tied_parameters(model)
    # The root hook only returns outputs on the caller's device; the others do the work.
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    attach_align_device_hook(
        model,
        execution_device=execution_device,
        offload=True,
        offload_buffers=offload_buffers,
        weights_map=weights_map,
        preload_module_classes=preload_classes,
    )
    _tie_meta_placeholders(model, tied_params)
    _start_serving(model)


def _start_serving(model: nn.Module) -> None:
    """The last step of every offload: store-served weights are read ahead of their forward
    (and the most used kept resident), and forwards of the model are serialised."""
    attach_prefetcher(model)
    share_forward_lock(model)


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: torch.device | str | int | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Moves the whole model to CPU now and to ``execution_device`` at its first forward,
    where it stays until ``hook.offload()``. Returns ``(model, hook)``.

    ``prev_module_hook``: the hook of the previous model of a pipeline, offloaded when this
    model's forward starts. ``execution_device`` defaults to MPS, else CUDA, else CPU.
    """
    hook = CpuOffload(execution_device=execution_device, prev_module_hook=prev_module_hook)
    add_hook_to_module(model, hook, append=True)
    return model, UserCpuOffloadHook(model, hook)


# --------------------------------------------------------------------------------------
# dispatch_model
# --------------------------------------------------------------------------------------


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, str | int | torch.device],
    main_device: str | int | torch.device | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike | None = None,
    offload_index: Mapping[str, Mapping] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
    *,
    max_resident: int | str | None = None,
) -> nn.Module:
    """Places each block of ``device_map`` on its device and attaches the hooks that move
    activations between devices and load offloaded weights for their forward.

    Args:
        model: the model (modified in place and returned; ``model.hf_device_map`` is set).
        device_map: module name -> device (int, "cpu", "disk", a torch device string or
            ``torch.device``). ``"cpu"`` entries are offloaded to RAM unless the main device
            is the CPU; ``"disk"`` entries are served by the store in ``offload_dir``.
        main_device: where offloaded modules run and inputs go; defaults to the first
            device that is neither "cpu" nor "disk" (the smallest index), else "cpu".
        state_dict: CPU tensors for the offloaded modules; they win over the store.
        offload_dir: the folder of the disk store (see `bigmodel.offload.stores`).
        offload_index: accelerate's offload index (name -> ``.dat`` entry or
            ``safetensors_file`` entry), used instead of the folder's own index.
        offload_buffers: offload persistent buffers too.
        skip_keys: input/output mapping keys never moved between devices.
        preload_module_classes: class names whose instances load their subtree at once.
        force_hooks: attach hooks even when the whole model is on one device.
        max_resident: bigmodel extension: RAM budget of the disk store's cache. Without it,
            the CPU budget the map was planned with (by `infer_auto_device_map`) minus the
            weights kept in RAM, else a share of the machine's memory (`bigmodel.budget`).

    With a single device (no "disk", no ``force_hooks``) the model is simply moved there.
    """
    check_device_map(model, device_map)
    options = _DispatchOptions(
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
    )
    disk = _DiskArguments(offload_dir, offload_index, max_resident)
    return _dispatch(model, device_map, main_device, state_dict, options, disk)


@dataclass(frozen=True)
class LoadedForDispatch:
    """What loading a checkpoint decided that dispatching it needs: the device map was
    checked, the tied parameters found, and the store serving the "disk" tensors committed
    (None when nothing goes to disk), with the byte budget of its cache."""

    tied_params: list[list[str]]
    disk_store: CommittedStore | None
    budget: int | None


def dispatch_loaded_model(
    model: nn.Module,
    device_map: Mapping[str, Device],
    loaded: LoadedForDispatch,
    offload_buffers: bool = False,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """`dispatch_model` for a model `load_checkpoint_in_model` just loaded: the same
    result, from what loading decided instead of discovering and checking it again."""
    options = _DispatchOptions(offload_buffers, skip_keys, preload_module_classes, force_hooks)
    return _dispatch(model, device_map, None, None, options, loaded)


@dataclass(frozen=True)
class _DispatchOptions:
    """The arguments of `dispatch_model` that shape the hooks."""

    offload_buffers: bool
    skip_keys: str | list[str] | None
    preload_module_classes: list[str] | None
    force_hooks: bool


@dataclass(frozen=True)
class _DiskArguments:
    """The arguments of `dispatch_model` that say where the offloaded weights are."""

    offload_dir: str | os.PathLike | None
    offload_index: Mapping[str, Mapping] | None
    max_resident: int | str | None


@dataclass(frozen=True)
class _DispatchPlan:
    """Everything attaching the hooks needs, decided before any hook is attached."""

    device_map: Mapping[str, Device]
    execution_device: dict[str, Device]  # block -> where it runs ("" too)
    offload: dict[str, bool]  # block -> whether its weights are fetched for each forward
    weights_map: StoreWeightsMap | None  # serves the offloaded blocks
    tied_params: list[list[str]]


def _dispatch(model, device_map, main_device, state_dict, options, disk) -> nn.Module:
    """Attaches hooks when the map needs them, else moves the model to its one device;
    ``disk`` is `_DiskArguments` or `LoadedForDispatch`."""
    devices = set(device_map.values())
    if len(devices) > 1 or "disk" in devices or options.force_hooks or _needs_hooks_for_bnb(model):
        plan = _plan(model, device_map, main_device, state_dict, options, disk)
        _attach_hooks(model, plan, options)
    else:
        model.to(next(iter(devices)))
    model.hf_device_map = dict(device_map)
    return model


def _plan(model, device_map, main_device, state_dict, options, disk) -> _DispatchPlan:
    if main_device is None:
        main_device = _pick_main_device(set(device_map.values()))
    # On a CPU (or MPS) main device, "cpu" blocks simply run where they are.
    offloaded_devices = ("disk",) if main_device in ("cpu", "mps") else _OFFLOADED_DEVICES
    offloaded_blocks = [name for name, d in device_map.items() if d in offloaded_devices]
    cpu_blocks = [name for name, d in device_map.items() if d == "cpu"]
    if main_device != "cpu" and state_dict is None and cpu_blocks:
        state_dict = tensors_under(model.state_dict(), cpu_blocks)
    if isinstance(disk, LoadedForDispatch):
        sources = {} if disk.disk_store is None else disk.disk_store.sources(disk.budget)
        tied_params = disk.tied_params
    else:
        sources = _offloaded_sources(model, device_map, offloaded_blocks, state_dict, options, disk)
        tied_params = find_tied_parameters(model)
    execution_device = {
        name: main_device if device in _OFFLOADED_DEVICES else device
        for name, device in device_map.items()
    }
    execution_device[""] = main_device
    return _DispatchPlan(
        device_map=device_map,
        execution_device=execution_device,
        offload={name: device in offloaded_devices for name, device in device_map.items()},
        weights_map=None
        if state_dict is None and not sources
        else StoreWeightsMap(state_dict, sources),
        tied_params=tied_params,
    )


def _offloaded_sources(model, device_map, offloaded_blocks, state_dict, options, disk):
    """Where each tensor of the offloaded blocks that ``state_dict`` lacks is served from:
    the offload index, else the store of the offload folder; checked against the model."""
    disk_blocks = [name for name, device in device_map.items() if device == "disk"]
    budget = None
    if disk_blocks or disk.offload_index:
        budget = disk_cache_budget(model, device_map, disk.max_resident)
    if disk_blocks and disk.offload_dir is None and disk.offload_index is None:
        raise ValueError(
            "We need an `offload_dir` to dispatch this model according to this `device_map`, "
            f"the following submodules need to be offloaded: {', '.join(disk_blocks)}."
        )
    in_ram = state_dict or {}
    fetched = fetched_tensors(model, offloaded_blocks, options.offload_buffers)
    needed = {name: shape for name, shape in fetched.items() if name not in in_ram}
    if disk.offload_index is not None:
        folder = disk.offload_dir if disk_blocks else None
        return sources_in_index(disk.offload_index, folder, needed, tie_candidates(model), budget)
    if disk_blocks:
        return sources_in_folder(
            disk.offload_dir,
            needed,
            tie_candidates(model),
            lambda: tensors_under(model.state_dict(keep_vars=True), disk_blocks),
            budget,
        )
    check_sources(needed, {}, "the state_dict")
    return {}


def _attach_hooks(model: nn.Module, plan: _DispatchPlan, options: _DispatchOptions) -> None:
    attach_align_device_hook_on_blocks(
        model,
        execution_device=plan.execution_device,
        offload=plan.offload,
        offload_buffers=options.offload_buffers,
        weights_map=plan.weights_map,
        skip_keys=options.skip_keys,
        preload_module_classes=options.preload_module_classes,
        tied_params_map=_tied_params_map(model, plan.tied_params),
    )
    offloaded_to = [device for device in _OFFLOADED_DEVICES if device in plan.device_map.values()]
    if offloaded_to:
        logger.warning(
            "Some parameters are on the meta device because they were offloaded to the "
            f"{' and '.join(offloaded_to)}."
        )
    # Hooks replace offloaded tensors by placeholders: tie them again.
    retie_parameters(model, plan.tied_params)
    _tie_meta_placeholders(model, plan.tied_params)
    _start_serving(model)
    _guard_moves(model)


def _pick_main_device(devices: set) -> Device:
    """The first device that is not "cpu"/"disk": the smallest accelerator index, else the
    first in name order (accelerate takes an arbitrary one), else "cpu"."""
    candidates = [device for device in devices if device not in _OFFLOADED_DEVICES]
    if not candidates:
        return "cpu"
    return min(candidates, key=lambda d: (0, d, "") if isinstance(d, int) else (1, 0, str(d)))


def _needs_hooks_for_bnb(model: nn.Module) -> bool:
    """bitsandbytes models too old to be moved with ``.to`` must be dispatched with hooks."""
    if getattr(model, "quantization_method", "bitsandbytes") != "bitsandbytes":
        return False
    if getattr(model, "is_loaded_in_8bit", False):
        return not _has_bnb_version((0, 48, 0))
    if getattr(model, "is_loaded_in_4bit", False):
        return not _has_bnb_version((0, 43, 2))
    return False


def _has_bnb_version(minimum: tuple[int, ...]) -> bool:
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        return False
    numbers = tuple(int(part) for part in installed.split("+")[0].split(".")[:3] if part.isdigit())
    return numbers >= minimum


def _tied_params_map(model: nn.Module, tied_params: list[list[str]]) -> dict[int, dict]:
    """data pointer -> {} for every tied parameter that has data, so hooks materialise a tied
    weight once per device."""
    tied_map: dict[int, dict] = {}
    for group in tied_params:
        for name in group:
            parameter = get_tensor(model, name)
            if parameter.device.type != "meta":
                tied_map[parameter.data_ptr()] = {}
    return tied_map


def _tie_meta_placeholders(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Gives every all-meta tied group one shared placeholder, so the tie holds between
    forwards (the hooks put back the placeholder object they replaced)."""
    for group in tied_params:
        parameters = [get_tensor(model, name) for name in group]
        if all(p.device.type == "meta" for p in parameters):
            for name in group[1:]:
                owner, leaf = owner_and_leaf(model, name)
                owner._parameters[leaf] = parameters[0]


# --------------------------------------------------------------------------------------
# Guarded .to() / .cuda()
# --------------------------------------------------------------------------------------


def _guard_moves(model: nn.Module) -> None:
    """Wraps ``model.to`` and ``model.cuda`` (or ``xpu``): warn, and refuse when weights are
    offloaded. `remove_hook_from_module` restores the class's methods."""
    backend = "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else "cuda"
    for method_name in ("to", backend):
        method = getattr(type(model), method_name)
        # A partial holding the model (not a closure), so copy.deepcopy rebinds it.
        guarded = functools.partial(_move_dispatched_model, model, method_name)
        setattr(model, method_name, functools.update_wrapper(guarded, method))


def _move_dispatched_model(model: nn.Module, method_name: str, *args, **kwargs):
    moves_device = method_name != "to" or torch._C._nn._parse_to(*args, **kwargs)[0] is not None
    if moves_device:
        logger.warning("You shouldn't move a model that is dispatched using bigmodel hooks.")
    if any(parameter.device.type == "meta" for parameter in model.parameters()):
        raise RuntimeError("You can't move a model that has some modules offloaded to cpu or disk.")
    return getattr(type(model), method_name)(model, *args, **kwargs)
