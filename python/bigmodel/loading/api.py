"""accelerate's loading API on the store: `load_checkpoint_in_model`,
`load_checkpoint_and_dispatch`.

``load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_memory=...)`` plans on the
meta model (one walk: budgets, map and tied parameters), then:

- tensors mapped to ``"disk"`` are never read: the checkpoint's safetensors shards are
  *mounted* as the offload store (only an index is written); only ``.bin`` tensors and tied
  copies that the checkpoint does not hold are written;
- the resident part is loaded tensor by tensor from memory-mapped files, so peak RAM is the
  resident weights plus one tensor (never a whole shard); a CPU tensor whose dtype already
  matches is a zero-copy view of the checkpoint file, read (and made resident) in the
  background, so the call returns before those reads end and the first forward overlaps them;
- the dispatch step serves the offloaded modules from the store loading committed, with what
  loading decided (`LoadedForDispatch`): the map is checked, the ties found and the names and
  shapes checked once.

Differences from accelerate are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bigmodel.budget import disk_cache_budget
from bigmodel.dispatch import LoadedForDispatch, dispatch_loaded_model
from bigmodel.loading.apply import (
    commit_offload_store,
    load_resident,
    place_offload_placeholders,
    retie,
)
from bigmodel.loading.files import CheckpointReader, checkpoint_files, logger
from bigmodel.loading.plan import check_device_map_for_loading, check_plan, plan_load
from bigmodel.offload.stores import CommittedStore
from bigmodel.planning.budgets import get_max_memory
from bigmodel.planning.reports import missing_offload_folder_error
from bigmodel.planning.strategies import plan_for_strategy
from bigmodel.tensors import as_torch_dtype
from bigmodel.tied import (
    check_tied_parameters_in_config,
    check_tied_parameters_on_same_device,
    find_tied_parameters,
)


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    device_map: dict[str, int | str | torch.device] | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: list[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> None:
    """Loads a (possibly sharded) checkpoint into ``model``, tensor by tensor.

    Args:
        model: the model; may be empty (built under ``init_empty_weights``).
        checkpoint: a state-dict file, the ``.json`` index of a sharded checkpoint, or a
            folder holding ``pytorch_model.bin``, ``model.safetensors`` or one ``*.index.json``.
        device_map: module or tensor name -> device (``"cpu"``, ``"disk"``, an accelerator
            index, a torch device). None: every tensor stays on its current device (the CPU
            for meta tensors).
        offload_folder: where the store serving the ``"disk"`` tensors is committed; required
            when the map holds ``"disk"``. Safetensors tensors are served in place from the
            checkpoint files, so only an index is written for them.
        dtype: floating-point tensors are loaded in this dtype (offloaded ones are cast when
            used); None keeps the model's dtypes.
        offload_state_dict: accepted for compatibility; loading is always streamed, so the peak
            RAM is the resident weights plus one tensor without a temporary folder.
        offload_buffers: whether buffers of disk modules are offloaded too (otherwise they are
            loaded to the CPU with their checkpoint values).
        keep_in_fp32_modules: modules (dotted names, matched as whole components) whose
            floating-point tensors stay in float32 whatever ``dtype`` is.
        offload_8bit_bnb, broadcast_from_rank0: not supported (NotImplementedError if True).
        strict: raise when the checkpoint has tensors the model lacks or lacks model tensors.
        full_state_dict: accepted for compatibility (checkpoints hold whole tensors).

    Raises:
        CheckpointMismatchError: shapes differ, a meta tensor has no value in the checkpoint,
            or (strict) keys differ. Nothing is loaded when this is raised.
        ValueError: bad device_map (unknown keys, uncovered tensors, non-devices), or "disk"
            without an ``offload_folder``.
    """
    _refuse_unsupported(offload_8bit_bnb, broadcast_from_rank0)
    request = _LoadRequest(
        device_map, offload_folder, _dtype(dtype), offload_buffers, keep_in_fp32_modules, strict
    )
    _load(model, checkpoint, request, find_tied_parameters(model))


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    device_map: str | dict[str, int | str | torch.device] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    no_split_module_classes: list[str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | list[str] | None = None,
    preload_module_classes: list[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    max_resident: int | str | None = None,
) -> nn.Module:
    """Loads a checkpoint into ``model`` and dispatches it according to ``device_map``.

    ``device_map`` is a dict (see :func:`load_checkpoint_in_model`), None (load only, no
    hooks), or one of "auto", "balanced", "balanced_low_0", "sequential": the map is then
    planned with ``infer_auto_device_map`` within ``max_memory`` (balanced budgets across
    accelerators for all but "sequential"). ``no_split_module_classes`` defaults to the model's
    ``_no_split_modules`` (transformers models), so no block is split across devices.

    Tensors mapped to "disk" are served from a store committed in ``offload_folder``; for a
    safetensors checkpoint the store mounts the checkpoint files, so nothing but an index is
    written. ``skip_keys``, ``preload_module_classes`` and ``force_hooks`` go to
    ``dispatch_model``; the other arguments to :func:`load_checkpoint_in_model`.

    The disk store's RAM budget (bigmodel extension ``max_resident``) defaults to the CPU
    budget (``max_memory["cpu"]``, or the one the map was planned with) minus the weights
    the map keeps in RAM, so that both together stay within it (see `bigmodel.budget`).

    Returns the model (dispatched, with ``hf_device_map`` set, unless ``device_map`` is None).
    """
    _refuse_unsupported(False, broadcast_from_rank0)
    dtype = _dtype(dtype)
    budgets = None
    if isinstance(device_map, str):
        plan = plan_for_strategy(
            model, device_map, max_memory, no_split_module_classes, dtype, offload_buffers
        )
        device_map, budgets, tied_params = plan.device_map, plan.budgets, plan.tied_params
    else:
        tied_params = find_tied_parameters(model)
    request = _LoadRequest(device_map, offload_folder, dtype, offload_buffers, None, strict)
    disk_store = _load(model, checkpoint, request, tied_params, budgets)
    if device_map is None:
        return model
    if budgets is None and max_memory is not None:
        budgets = get_max_memory(dict(max_memory))
    budget = None
    if disk_store is not None or max_resident is not None:
        cpu_budget = None if budgets is None else budgets.get("cpu")
        budget = disk_cache_budget(model, device_map, max_resident, cpu_budget)
    return dispatch_loaded_model(
        model,
        device_map,
        LoadedForDispatch(tied_params, disk_store, budget),
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
    )


@dataclass(frozen=True)
class _LoadRequest:
    """The arguments of `load_checkpoint_in_model` that say what to load where."""

    device_map: Mapping[str, int | str | torch.device] | None
    offload_folder: str | os.PathLike | None
    dtype: torch.dtype | None
    offload_buffers: bool
    keep_in_fp32_modules: list[str] | None
    strict: bool


def _load(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    request: _LoadRequest,
    tied_params: list[list[str]],
    budgets: Mapping | None = None,
) -> CommittedStore | None:
    """Checks, plans and carries out the load; returns the offload store it committed (None
    when nothing goes to disk). ``budgets``: the per-device budgets the map was planned
    with, for the error that says what goes where when there is no offload folder."""
    device_map = request.device_map
    if device_map is not None:
        check_device_map_for_loading(model, device_map)
    _check_ties(model, tied_params, device_map)
    offloads_to_disk = device_map is not None and "disk" in device_map.values()
    if offloads_to_disk and request.offload_folder is None:
        raise missing_offload_folder_error(model, device_map, request.dtype, budgets)
    reader = CheckpointReader(checkpoint_files(checkpoint))
    disk_store = None
    try:
        plan = plan_load(
            model,
            reader.catalog,
            device_map,
            request.dtype,
            request.keep_in_fp32_modules,
            request.offload_buffers,
            tied_params,
        )
        check_plan(plan, model, checkpoint, request.strict)
        if offloads_to_disk:
            os.makedirs(request.offload_folder, exist_ok=True)
            folder = os.fspath(request.offload_folder)
            disk_store = commit_offload_store(folder, plan, reader, model)
        load_resident(model, plan, reader, in_place=device_map is None)
        place_offload_placeholders(model, plan)
    finally:
        reader.close()
    retie(model, tied_params)
    return disk_store


def _check_ties(model: nn.Module, tied_params: list[list[str]], device_map) -> None:
    """Warns when a transformers model should have tied weights but has none, and when the
    map puts the names of one tied parameter on several devices."""
    if check_tied_parameters_in_config(model) and not tied_params:
        logger.warning(
            "The model weights are not tied. Please use the `tie_weights` method before using "
            "the `infer_auto_device` function."
        )
    if device_map is not None:
        check_tied_parameters_on_same_device(tied_params, device_map)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return None if dtype is None else as_torch_dtype(dtype)


def _refuse_unsupported(offload_8bit_bnb: bool, broadcast_from_rank0: bool) -> None:
    if offload_8bit_bnb:
        raise NotImplementedError("bigmodel does not load bitsandbytes 8-bit checkpoints")
    if broadcast_from_rank0:
        raise NotImplementedError(
            "bigmodel loads every rank from the checkpoint files; broadcast_from_rank0 is not "
            "supported"
        )
