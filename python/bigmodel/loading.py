"""Loading checkpoints into (possibly empty) models: accelerate's loading API on the store.

``load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_memory=...)`` plans on the
meta model, then:

- tensors mapped to ``"disk"`` are never read: the checkpoint's safetensors shards are
  *mounted* as the offload store (only an index is written); only ``.bin`` tensors and tied
  copies that the checkpoint does not hold are written;
- the resident part is loaded tensor by tensor from memory-mapped files, so peak RAM is the
  resident weights plus one tensor (never a whole shard); a CPU tensor whose dtype already
  matches is a zero-copy view of the checkpoint file, read (and made resident) in the
  background, so the call returns before those reads end and the first forward overlaps them;
- ``dispatch_model`` then serves the offloaded modules from that store.

Differences from accelerate are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file as safe_load_file
from torch import nn

from bigmodel import _core
from bigmodel.budget import disk_cache_budget
from bigmodel.dispatch import dispatch_model
from bigmodel.hooks import align_module_device, has_offloaded_params
from bigmodel.planning.budgets import get_max_memory
from bigmodel.planning.checks import check_device_map
from bigmodel.planning.module_sizes import compute_module_sizes
from bigmodel.planning.strategies import plan_for_strategy
from bigmodel.sizes import format_size
from bigmodel.store import TensorStore, write_mount, write_store
from bigmodel.tensors import set_module_tensor_to_device
from bigmodel.tied import (
    check_tied_parameters_in_config,
    check_tied_parameters_on_same_device,
    find_tied_parameters,
    retie_parameters,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"
# Sub-folder of the offload folder holding the few tensors that have to be written (see
# `_commit_offload_store`); the store in the offload folder mounts its shards.
WRITTEN_SUBFOLDER = "written"


class CheckpointMismatchError(ValueError, RuntimeError):
    """The checkpoint's tensors do not match the model's (unexpected, missing or reshaped).

    A ``ValueError`` like accelerate's errors on the device-map path and a ``RuntimeError``
    like ``torch.nn.Module.load_state_dict(strict=True)``, so either ``except`` catches it.
    """


# --------------------------------------------------------------------------------------
# Finding the checkpoint's files
# --------------------------------------------------------------------------------------


def checkpoint_files(checkpoint: str | os.PathLike) -> list[str]:
    """The files holding a checkpoint, in the order they are loaded.

    ``checkpoint`` is a file ending in ``.json`` (the index of a sharded checkpoint), any other
    file (a whole state dict), a bigmodel store (its directory, read as one source, or its
    index file), or a folder holding ``pytorch_model.bin`` (preferred), ``model.safetensors``,
    or exactly one ``*.index.json``. Shards are sorted by file name.
    """
    path = os.fspath(checkpoint)
    if os.path.isfile(path) and os.path.basename(path) == _core.INDEX_FILE:
        return [os.path.dirname(path) or "."]
    if os.path.isfile(path):
        return _shards_of_index(path) if path.endswith(".json") else [path]
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, _core.INDEX_FILE)):
        return [path]
    if os.path.isdir(path):
        return _files_in_folder(path)
    raise ValueError(
        "`checkpoint` should be the path to a file containing a whole state dict, or the index of "
        "a sharded checkpoint, or a folder containing a sharded checkpoint or the whole state "
        f"dict, but got {checkpoint}."
    )


def _files_in_folder(folder: str) -> list[str]:
    names = os.listdir(folder)
    for whole_state_dict in (WEIGHTS_NAME, SAFE_WEIGHTS_NAME):
        if whole_state_dict in names:
            return [os.path.join(folder, whole_state_dict)]
    indexes = [name for name in names if name.endswith(".index.json")]
    if not indexes:
        raise ValueError(
            f"{folder} is not a folder containing a `.index.json` file or a {WEIGHTS_NAME} or a "
            f"{SAFE_WEIGHTS_NAME} file"
        )
    if len(indexes) > 1:
        raise ValueError(
            f"{folder} containing more than one `.index.json` file, delete the irrelevant ones."
        )
    return _shards_of_index(os.path.join(folder, indexes[0]))


def _shards_of_index(index_file: str) -> list[str]:
    """The shard files an index names (HF ``{"weight_map": ...}`` or a bare map), sorted."""
    try:
        with open(index_file) as f:
            index = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint index {index_file} is not valid JSON: {error}") from None
    weight_map = index.get("weight_map", index)
    folder = os.path.dirname(index_file)
    shards = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    absent = [shard for shard in shards if not os.path.isfile(shard)]
    if absent:
        raise FileNotFoundError(
            f"checkpoint index {index_file} names shard files that do not exist: {absent}"
        )
    return shards


# --------------------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------------------


def _check_safetensors_format(checkpoint_file: str) -> None:
    """Refuses safetensors files not saved from PyTorch, as transformers writes them."""
    with safe_open(checkpoint_file, framework="pt") as f:
        metadata = f.metadata()
    if metadata is None:
        logger.warning(
            f"The safetensors archive passed at {checkpoint_file} does not contain metadata. "
            "Make sure to save your model with the `save_pretrained` method. Defaulting to 'pt' "
            "metadata."
        )
        return
    if metadata.get("format") not in ("pt", "tf", "flax"):
        raise OSError(
            f"The safetensors archive passed at {checkpoint_file} does not contain the valid "
            "metadata. Make sure you save your model with the `save_pretrained` method."
        )
    if metadata["format"] != "pt":
        raise ValueError(
            f"The checkpoint passed was saved with {metadata['format']}, we need a the pt format."
        )


def _device_of_key(name: str, device_map: Mapping[str, object]):
    """The device of the longest device_map key that is ``name`` or a dotted prefix of it."""
    key = name
    while key not in device_map:
        if not key:
            return None
        key = key.rpartition(".")[0]
    return device_map[key]


def _loadable_device(device):
    """Where safetensors can put a tensor: "disk" tensors are read to the CPU."""
    return "cpu" if device == "disk" else device


def load_state_dict(checkpoint_file: str | os.PathLike, device_map=None) -> dict:
    """Loads one checkpoint file into a dict of tensors.

    A ``.safetensors`` file must have been saved from PyTorch (``format: pt`` metadata; missing
    metadata only warns). With a ``device_map``, each tensor goes straight to the device of the
    longest key that names it or one of its parent modules ("disk" and unmapped tensors go to
    the CPU). Any other file is read with ``torch.load(weights_only=True)`` onto the CPU.
    """
    checkpoint_file = os.fspath(checkpoint_file)
    if not checkpoint_file.endswith(".safetensors"):
        return torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    _check_safetensors_format(checkpoint_file)
    if device_map is None:
        return safe_load_file(checkpoint_file)
    devices = {_loadable_device(device) for device in device_map.values()}
    if len(devices) == 1:
        return safe_load_file(checkpoint_file, device=devices.pop())
    tensors = {}
    with safe_open(checkpoint_file, framework="pt") as f:
        names_by_device: dict[object, list[str]] = {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            device = _device_of_key(name, device_map)
            device = "cpu" if device is None else _loadable_device(device)
            names_by_device.setdefault(device, []).append(name)
    for device, names in names_by_device.items():
        with safe_open(checkpoint_file, framework="pt", device=device) as f:
            tensors.update((name, f.get_tensor(name)) for name in names)
    return tensors


# --------------------------------------------------------------------------------------
# Reading a checkpoint lazily
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CheckpointTensor:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    # The safetensors file that holds the tensor's bytes as they are, so the offload store can
    # serve it in place; None when it must be written (torch files, compressed tensors).
    mount_file: str | None


class _CheckpointReader:
    """Every tensor of a checkpoint, without reading any data up front.

    Safetensors files are mounted (zero-copy views of the file) and bigmodel stores opened;
    torch files are loaded with ``mmap=True`` so a tensor's bytes are only read when used.
    ``catalog`` holds each name's file, dtype and shape; a name present in several files
    comes from the last one, as when accelerate loads the shards in order.
    """

    def __init__(self, files: Iterable[str]):
        self._sources: dict[str, Mapping[str, torch.Tensor]] = {}
        self.catalog: dict[str, _CheckpointTensor] = {}
        try:
            for path in files:
                self._sources[path] = source = _open_lazily(path)
                for name in source:
                    self.catalog[name] = _describe(source, name, path)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sources[self.catalog[name].file][name]

    def start_reading(self, names: Iterable[str]) -> None:
        """Starts the disk reading the mounted tensors among ``names`` and a thread making
        their pages resident, in order: loading returns at once, and the first forward only
        waits for the tensors not read yet."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.catalog[name].file, []).append(name)
        for path, file_names in by_file.items():
            source = self._sources[path]
            if isinstance(source, TensorStore):
                source.will_need(file_names)
                source.populate_in_background(file_names)

    def close(self) -> None:
        """Releases the files; tensors already handed out stay valid."""
        for source in self._sources.values():
            if isinstance(source, TensorStore):
                source.close()
        self._sources.clear()


def _open_lazily(path: str) -> Mapping[str, torch.Tensor]:
    # No cache budget: a tensor that was cast (or offloaded) gives its pages back as soon
    # as it is dropped; tensors kept as zero-copy weights stay pinned by their owners
    # (views, asked for explicitly: a budget alone would make the store read copies).
    # Views are not populated here: `_load_resident` has them read and made resident in
    # the background, and the first forward overlaps its compute with those reads.
    views = {"max_resident": 0, "zero_copy": True, "populate_views": False}
    if os.path.isdir(path):  # a bigmodel store
        return TensorStore.open(path, **views)
    if path.endswith(".safetensors"):
        _check_safetensors_format(path)
        return TensorStore.mount([path], **views)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files from the legacy (non-zip) torch.save format cannot be mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}


def _describe(source: Mapping[str, torch.Tensor], name: str, path: str) -> _CheckpointTensor:
    if isinstance(source, TensorStore):
        info = source.info(name)
        in_place = info["codec"] == "none" and info["file"].endswith(".safetensors")
        mount_file = info["file"] if in_place else None
        return _CheckpointTensor(path, info["dtype"], tuple(info["shape"]), mount_file)
    tensor = source[name]
    return _CheckpointTensor(path, tensor.dtype, tuple(tensor.shape), mount_file=None)


# --------------------------------------------------------------------------------------
# Checking the caller's device_map
# --------------------------------------------------------------------------------------


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


def _check_device_map_for_loading(model: nn.Module, device_map: Mapping[str, object]) -> None:
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


def _missing_offload_folder_error(
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


# --------------------------------------------------------------------------------------
# Planning: where each model tensor comes from and where it goes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """One model tensor: which checkpoint tensor feeds it (None: keep the model's own value),
    where it goes ("disk" or a device), and the dtype to load it in (None: the model's)."""

    source: str | None
    device: object
    dtype: torch.dtype | None


@dataclass
class _LoadPlan:
    routes: dict[str, _Route] = field(default_factory=dict)
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


def _plan_load(model, catalog, device_map, dtype, keep_in_fp32_modules, offload_buffers, tied):
    """Routes every model state-dict tensor; records unexpected, missing and reshaped names."""
    plan = _LoadPlan()
    model_tensors = model.state_dict(keep_vars=True)
    buffer_names = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    tie_sources = _tie_sources(tied, catalog)
    for name, current in model_tensors.items():
        source = name if name in catalog else tie_sources.get(name)
        if device_map is None:
            device = "cpu" if current.device.type == "meta" else current.device
        else:
            device = _device_of_key(name, device_map)
        if device == "disk" and name in buffer_names and not offload_buffers:
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
        plan.routes[name] = _Route(
            source, device, _load_dtype(name, stored, dtype, keep_in_fp32_modules)
        )
    plan.unexpected = [name for name in catalog if name not in model_tensors]
    return plan


def _name_list(names: list[str], shown: int = 10) -> str:
    """The first names of a list that may hold thousands, and how many were left out."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def _check_plan(plan: _LoadPlan, model: nn.Module, checkpoint, strict: bool) -> None:
    """Raises on reshaped tensors, on tensors left without data, and (strict) on any key
    mismatch; warns otherwise."""
    problems = []
    if plan.reshaped:
        problems.append(f"shapes differ: {_name_list(plan.reshaped)}")
    if plan.missing_on_meta:
        problems.append(
            "missing from the checkpoint while on the meta device (they would have no data): "
            f"{_name_list(plan.missing_on_meta)}"
        )
    if strict and plan.missing:
        problems.append(f"missing from the checkpoint: {_name_list(plan.missing)}")
    if strict and plan.unexpected:
        problems.append(f"in the checkpoint but not in the model: {_name_list(plan.unexpected)}")
    if problems:
        raise CheckpointMismatchError(
            f"Cannot load {checkpoint} into {type(model).__name__}: " + "; ".join(problems)
        )
    if plan.unexpected:
        logger.warning(
            f"Some weights of the model checkpoint at {checkpoint} were not used when initializing "
            f"{type(model).__name__}: {_name_list(plan.unexpected)}. This may or may not be an "
            "issue - make sure that the checkpoint does not have unnecessary parameters, or that "
            "the model definition correctly corresponds to the checkpoint."
        )
    if plan.missing:
        logger.warning(
            f"Some tensors of {type(model).__name__} are not in the checkpoint at {checkpoint} "
            f"and keep their current values: {_name_list(plan.missing)}"
        )


# --------------------------------------------------------------------------------------
# Executing the plan
# --------------------------------------------------------------------------------------


def _model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


def _commit_offload_store(folder: str, plan: _LoadPlan, reader: _CheckpointReader, model) -> None:
    """Commits in ``folder`` the store that serves every tensor routed to disk.

    Safetensors files holding a disk tensor are mounted (served in place, nothing copied). A
    tied name the checkpoint lacks needs nothing more: ``dispatch_model`` serves it under its
    partner's name, since the tie is kept (see `_retie`). The rest (``.bin`` tensors, model
    values the checkpoint lacks) is written, in a sub-folder whose shards the mount also
    serves when both kinds exist.
    """
    mounted_files, to_write = set(), {}
    for name, route in plan.routes.items():
        if route.device != "disk":
            continue
        if route.source is None:
            to_write[name] = _model_tensor(model, name).detach()
        elif reader.catalog[route.source].mount_file is not None:
            mounted_files.add(reader.catalog[route.source].mount_file)
        else:
            to_write[name] = reader[route.source]
    mounted_files = sorted(mounted_files)
    if mounted_files and to_write:
        written_folder = os.path.join(folder, WRITTEN_SUBFOLDER)
        write_store(written_folder, to_write)
        with TensorStore.open(written_folder) as written:
            shards = [os.path.join(written_folder, f["path"]) for f in written.files()]
        write_mount(folder, [*mounted_files, *shards])
    elif mounted_files:
        write_mount(folder, mounted_files)
    else:
        write_store(folder, to_write)


def _load_resident(model, plan: _LoadPlan, reader: _CheckpointReader, in_place: bool) -> None:
    """Sets every resident tensor from the checkpoint, one tensor at a time, in file order."""
    position = {name: index for index, name in enumerate(reader.catalog)}
    resident = [
        (name, route)
        for name, route in plan.routes.items()
        if route.device != "disk" and route.source is not None
    ]
    resident.sort(key=lambda item: position[item[1].source])
    reader.start_reading(route.source for _, route in resident)
    for name, route in resident:
        value = reader[route.source]
        current = _model_tensor(model, name)
        if in_place and current.device.type != "meta" and route.dtype in (None, current.dtype):
            # Like torch's load_state_dict: the model keeps its Parameter objects.
            with torch.no_grad():
                current.copy_(value)
        else:
            set_module_tensor_to_device(model, name, route.device, value=value, dtype=route.dtype)


def _place_offload_placeholders(model: nn.Module, plan: _LoadPlan) -> None:
    """Offloaded tensors become meta placeholders in the dtype they will compute in."""
    for name, route in plan.routes.items():
        if route.device == "disk":
            set_module_tensor_to_device(model, name, "meta", dtype=route.dtype)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accepts a torch dtype or its name, with or without the "torch." prefix."""
    if not isinstance(dtype, str):
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (such as 'float16' or 'bfloat16')")
    return resolved


def _find_ties(model: nn.Module, device_map) -> list[list[str]]:
    tied_params = find_tied_parameters(model)
    if check_tied_parameters_in_config(model) and not tied_params:
        logger.warning(
            "The model weights are not tied. Please use the `tie_weights` method before using "
            "the `infer_auto_device` function."
        )
    if device_map is not None:
        check_tied_parameters_on_same_device(tied_params, device_map)
    return tied_params


def _refuse_unsupported(offload_8bit_bnb: bool, broadcast_from_rank0: bool) -> None:
    if offload_8bit_bnb:
        raise NotImplementedError("bigmodel does not load bitsandbytes 8-bit checkpoints")
    if broadcast_from_rank0:
        raise NotImplementedError(
            "bigmodel loads every rank from the checkpoint files; broadcast_from_rank0 is not "
            "supported"
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
    dtype = _as_dtype(dtype)
    if device_map is not None:
        _check_device_map_for_loading(model, device_map)
    tied_params = _find_ties(model, device_map)
    offloads_to_disk = device_map is not None and "disk" in device_map.values()
    if offloads_to_disk and offload_folder is None:
        raise _missing_offload_folder_error(model, device_map, dtype, budgets=None)
    reader = _CheckpointReader(checkpoint_files(checkpoint))
    try:
        plan = _plan_load(
            model,
            reader.catalog,
            device_map,
            dtype,
            keep_in_fp32_modules,
            offload_buffers,
            tied_params,
        )
        _check_plan(plan, model, checkpoint, strict)
        if offloads_to_disk:
            os.makedirs(offload_folder, exist_ok=True)
            _commit_offload_store(os.fspath(offload_folder), plan, reader, model)
        _load_resident(model, plan, reader, in_place=device_map is None)
        _place_offload_placeholders(model, plan)
    finally:
        reader.close()
    _retie(model, tied_params)


def _retie(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Ties again what loading untied, including groups whose members are all offloaded
    (meta placeholders): they share one placeholder, so the tie stays visible to
    ``dispatch_model``, which then serves every name of the group from the one stored copy."""
    retie_parameters(model, tied_params)
    for group in tied_params:
        first = _model_tensor(model, group[0])
        if first.device.type == "meta":
            for name in group[1:]:
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, first)


# --------------------------------------------------------------------------------------
# load_checkpoint_and_dispatch
# --------------------------------------------------------------------------------------


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
    dtype = _as_dtype(dtype)
    budgets = None
    if isinstance(device_map, str):
        plan = plan_for_strategy(
            model, device_map, max_memory, no_split_module_classes, dtype, offload_buffers
        )
        device_map, budgets = plan.device_map, plan.budgets
    offloads_to_disk = device_map is not None and "disk" in device_map.values()
    if offloads_to_disk and offload_folder is None:
        raise _missing_offload_folder_error(model, device_map, dtype, budgets)
    if offload_state_dict is None:
        offload_state_dict = offloads_to_disk
    load_checkpoint_in_model(
        model,
        checkpoint,
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        offload_state_dict=offload_state_dict,
        offload_buffers=offload_buffers,
        strict=strict,
        full_state_dict=full_state_dict,
        broadcast_from_rank0=broadcast_from_rank0,
    )
    if device_map is None:
        return model
    if budgets is None and max_memory is not None:
        budgets = get_max_memory(dict(max_memory))
    cpu_budget = None if budgets is None else budgets.get("cpu")
    offloads = offloads_to_disk or (max_resident is not None)
    return dispatch_model(
        model,
        device_map=device_map,
        offload_dir=offload_folder,
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
        max_resident=(
            disk_cache_budget(model, device_map, max_resident, cpu_budget) if offloads else None
        ),
    )


# --------------------------------------------------------------------------------------
# State dicts of dispatched models
# --------------------------------------------------------------------------------------


def get_state_dict_offloaded_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a model whose modules may be offloaded, on the CPU.

    Each module's weights are brought to the CPU in turn (through its offload hook), so only
    one module's offloaded weights are materialised at a time besides the result. Unlike
    accelerate, tensors registered directly on the root module are included. Keys come in
    ``model.state_dict()`` order.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        try:
            with align_module_device(module, "cpu"):
                module_state = module.state_dict(prefix=prefix)
        except MemoryError:
            raise MemoryError(
                "Offloaded module must fit in CPU memory to call save_model!"
            ) from None
        for name, tensor in module_state.items():
            if tensor.device.type != "meta" and name not in state_dict:
                state_dict[name] = tensor.to("cpu")
    order = list(model.state_dict())
    not_saved = [name for name in order if name not in state_dict]
    if not_saved:
        logger.warning(
            "The following tensors were not saved because they were still on meta device: "
            f"{not_saved}"
        )
    return {name: state_dict[name] for name in order if name in state_dict}


def get_state_dict_from_offload(
    module: nn.Module,
    module_name: str,
    state_dict: dict[str, str | torch.Tensor],
    device_to_put_offload: int | str | torch.device = "cpu",
) -> dict[str, str | torch.Tensor]:
    """Fills the entries of ``state_dict`` that belong to ``module`` with its tensors.

    ``module_name`` is the name of one of the module's tensors (for instance
    ``"encoder.layer.0.output.dense.weight"``); its parent path is the module's prefix.
    Offloaded weights are brought to ``device_to_put_offload``; a module that is not offloaded
    gives its tensors as they are. Returns ``state_dict``.
    """
    root = module_name[: module_name.rfind(".")]
    device = device_to_put_offload if has_offloaded_params(module) else None
    with align_module_device(module, device):
        for key, tensor in module.state_dict().items():
            if f"{root}.{key}" in state_dict:
                state_dict[f"{root}.{key}"] = tensor
    return state_dict
