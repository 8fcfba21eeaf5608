"""Spreading a model over devices: `cpu_offload`, `cpu_offload_with_hook`, `disk_offload`,
`dispatch_model`.

Every weight that lives on disk is served by ONE bigmodel store in the offload folder:

- a folder holding a bigmodel store (``bigmodel.index.json``, including "mount" stores that
  point at a checkpoint's safetensors files in place) is opened as it is;
- a folder written by accelerate or transformers (``index.json`` + ``.dat`` files) is mounted
  in place, nothing copied;
- otherwise the weights are written there as a store (never as ``.dat`` files); a tensor tied
  between modules is written once, and its other names are recorded beside the store
  (``bigmodel.ties.json``), so that an untied instance of the same model can reuse the folder.

Unlike accelerate, an existing folder is checked against the model before it is used: a
missing tensor or a shape mismatch raises a `ValueError` naming it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from safetensors import safe_open
from torch import nn

from bigmodel.budget import disk_cache_budget
from bigmodel.device_map import check_device_map
from bigmodel.hooks import (
    AlignDevicesHook,
    CpuOffload,
    UserCpuOffloadHook,
    add_hook_to_module,
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
    share_forward_lock,
)
from bigmodel.offload import (
    OffloadedWeightsLoader,
    StoreWeightsMap,
    TensorSource,
    extract_submodules_state_dict,
)
from bigmodel.prefetch import attach_prefetcher
from bigmodel.store import TensorStore, write_store
from bigmodel.tied import find_tied_parameters, retie_parameters

logger = logging.getLogger(__name__)

STORE_INDEX_FILE = "bigmodel.index.json"  # a bigmodel store (written or mount)
# Beside a store that bigmodel wrote from a model with tied tensors: each tied name that was
# not written -> the name its tensor was written under, so an untied twin can reuse the store.
WRITTEN_TIES_FILE = "bigmodel.ties.json"
ACCELERATE_INDEX_FILE = "index.json"  # an accelerate offload folder (.dat files)
_OFFLOADED_DEVICES = ("cpu", "disk")
# How many offending names an error message lists before summarising the rest.
_NAMES_SHOWN = 5


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
    needed = _fetched_tensors(model, [""], offload_buffers)
    budget = disk_cache_budget(model, {"": "disk"}, max_resident)
    store = _offload_store(offload_dir, lambda: model.state_dict(keep_vars=True), budget)
    sources = _store_sources(store, needed, _tie_candidates(model), _written_ties(offload_dir))
    _check_sources(needed, sources, offload_dir)
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
        offload_dir: the folder of the disk store (see the module docstring).
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
    devices = set(device_map.values())
    if len(devices) > 1 or "disk" in devices or force_hooks or _needs_hooks_for_bnb(model):
        options = _DispatchOptions(
            offload_dir=offload_dir,
            offload_index=offload_index,
            offload_buffers=offload_buffers,
            skip_keys=skip_keys,
            preload_module_classes=preload_module_classes,
            max_resident=max_resident,
        )
        _dispatch_with_hooks(model, device_map, main_device, state_dict, options)
    else:
        model.to(next(iter(devices)))
    model.hf_device_map = dict(device_map)
    return model


@dataclass(frozen=True)
class _DispatchOptions:
    """The arguments of `dispatch_model` that only the hook path uses."""

    offload_dir: str | os.PathLike | None
    offload_index: Mapping[str, Mapping] | None
    offload_buffers: bool
    skip_keys: str | list[str] | None
    preload_module_classes: list[str] | None
    max_resident: int | str | None


def _dispatch_with_hooks(model, device_map, main_device, state_dict, options) -> None:
    if main_device is None:
        main_device = _pick_main_device(set(device_map.values()))
    # On a CPU (or MPS) main device, "cpu" blocks simply run where they are.
    offloaded_devices = ("disk",) if main_device in ("cpu", "mps") else _OFFLOADED_DEVICES
    offloaded_blocks = [name for name, d in device_map.items() if d in offloaded_devices]
    cpu_blocks = [name for name, d in device_map.items() if d == "cpu"]
    if main_device != "cpu" and state_dict is None and cpu_blocks:
        state_dict = _tensors_under(model.state_dict(), cpu_blocks)
    weights_map = _offload_weights_map(model, device_map, offloaded_blocks, state_dict, options)

    execution_device = {
        name: main_device if device in _OFFLOADED_DEVICES else device
        for name, device in device_map.items()
    }
    execution_device[""] = main_device
    tied_params = find_tied_parameters(model)
    attach_align_device_hook_on_blocks(
        model,
        execution_device=execution_device,
        offload={name: device in offloaded_devices for name, device in device_map.items()},
        offload_buffers=options.offload_buffers,
        weights_map=weights_map,
        skip_keys=options.skip_keys,
        preload_module_classes=options.preload_module_classes,
        tied_params_map=_tied_params_map(model, tied_params),
    )
    offloaded_to = [device for device in _OFFLOADED_DEVICES if device in device_map.values()]
    if offloaded_to:
        logger.warning(
            "Some parameters are on the meta device because they were offloaded to the "
            f"{' and '.join(offloaded_to)}."
        )
    # Hooks replace offloaded tensors by placeholders: tie them again.
    retie_parameters(model, tied_params)
    _tie_meta_placeholders(model, tied_params)
    _start_serving(model)
    _guard_moves(model)


def _offload_weights_map(
    model, device_map, offloaded_blocks, state_dict, options: _DispatchOptions
) -> StoreWeightsMap | None:
    """The weights map of the offloaded blocks, checked to hold every tensor they fetch."""
    offload_dir, offload_index = options.offload_dir, options.offload_index
    disk_blocks = [name for name, device in device_map.items() if device == "disk"]
    budget = (
        disk_cache_budget(model, device_map, options.max_resident)
        if disk_blocks or offload_index
        else None
    )
    if disk_blocks and offload_dir is None and offload_index is None:
        raise ValueError(
            "We need an `offload_dir` to dispatch this model according to this `device_map`, "
            f"the following submodules need to be offloaded: {', '.join(disk_blocks)}."
        )
    in_ram = state_dict or {}
    needed = {
        name: shape
        for name, shape in _fetched_tensors(
            model, offloaded_blocks, options.offload_buffers
        ).items()
        if name not in in_ram
    }
    ties = _tie_candidates(model)
    if offload_index is not None:
        sources = _index_sources(offload_index, offload_dir if disk_blocks else None, ties, budget)
        where = "the offload_index"
    elif disk_blocks:
        store = _offload_store(
            offload_dir,
            lambda: _tensors_under(model.state_dict(keep_vars=True), disk_blocks),
            budget,
        )
        sources = _store_sources(store, needed, ties, _written_ties(offload_dir))
        where = os.fspath(offload_dir)
    else:
        sources, where = {}, "the state_dict"
    _check_sources(needed, sources, where)
    if state_dict is None and not sources:
        return None
    return StoreWeightsMap(state_dict, sources)


def _pick_main_device(devices: set) -> str | int | torch.device:
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
            parameter = model.get_parameter(name)
            if parameter.device.type != "meta":
                tied_map[parameter.data_ptr()] = {}
    return tied_map


def _tie_meta_placeholders(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Gives every all-meta tied group one shared placeholder, so the tie holds between
    forwards (the hooks put back the placeholder object they replaced)."""
    for group in tied_params:
        parameters = [model.get_parameter(name) for name in group]
        if all(p.device.type == "meta" for p in parameters):
            for name in group[1:]:
                owner_name, _, leaf = name.rpartition(".")
                model.get_submodule(owner_name)._parameters[leaf] = parameters[0]


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


# --------------------------------------------------------------------------------------
# The disk store: open, mount or write; check against the model
# --------------------------------------------------------------------------------------


def _offload_store(
    offload_dir: str | os.PathLike,
    tensors_to_write: Callable[[], Mapping[str, torch.Tensor]],
    max_resident: int | str | None,
) -> TensorStore:
    """The store in ``offload_dir``: opened, mounted (accelerate folder), or written first
    from ``tensors_to_write()`` (each tied tensor once)."""
    if os.path.isfile(os.path.join(offload_dir, STORE_INDEX_FILE)):
        return TensorStore.open(offload_dir, max_resident=max_resident)
    if os.path.isfile(os.path.join(offload_dir, ACCELERATE_INDEX_FILE)):
        return TensorStore.mount(offload_dir, max_resident=max_resident)
    tensors, ties = _first_name_per_tensor(tensors_to_write())
    on_meta = [name for name, tensor in tensors.items() if tensor.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"cannot offload {_name_list(on_meta)} to {os.fspath(offload_dir)}: on the meta "
            "device they have no data, and the folder holds no store to read them from. Load "
            "the weights first, or pass the folder of a store that holds them."
        )
    # Written before the store commits, so a committed store always has its ties beside it.
    _write_ties(offload_dir, ties)
    write_store(offload_dir, {name: tensor.detach() for name, tensor in tensors.items()})
    return TensorStore.open(offload_dir, max_resident=max_resident)


def _first_name_per_tensor(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` without the later names of a tensor that appears several times (ties),
    and each left-out name -> the name kept for its tensor."""
    first_name: dict[int, str] = {}
    unique = {}
    ties = {}
    for name, tensor in tensors.items():
        kept = first_name.setdefault(id(tensor), name)
        if kept == name:
            unique[name] = tensor
        else:
            ties[name] = kept
    return unique, ties


def _write_ties(offload_dir: str | os.PathLike, ties: Mapping[str, str]) -> None:
    path = os.path.join(offload_dir, WRITTEN_TIES_FILE)
    if not ties:
        if os.path.exists(path):  # left by an earlier store in this folder
            os.remove(path)
        return
    os.makedirs(offload_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(ties, f, indent=1)
    os.replace(path + ".tmp", path)


def _written_ties(offload_dir: str | os.PathLike) -> dict[str, str]:
    """The ties `_offload_store` recorded beside the store it wrote (empty if none)."""
    path = os.path.join(offload_dir, WRITTEN_TIES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tie_candidates(model: nn.Module) -> dict[str, list[str]]:
    """name -> the names under which the store may hold it: itself, then its tied partners
    (names sharing one tensor object), in state-dict order."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    candidates = {}
    for names in names_by_tensor.values():
        if len(names) > 1:
            for name in names:
                candidates[name] = [name] + [other for other in names if other != name]
    return candidates


def _fetched_tensors(
    model: nn.Module, blocks: Iterable[str], offload_buffers: bool
) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the offload hooks of ``blocks`` fetch from their weights
    map: parameters, plus persistent buffers with ``offload_buffers``."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    if offload_buffers:
        non_persistent = {
            f"{module_name}.{buffer}" if module_name else buffer
            for module_name, module in model.named_modules()
            for buffer in module._non_persistent_buffers_set
        }
        for name, buffer in model.named_buffers(remove_duplicate=False):
            if name not in non_persistent:
                tensors[name] = buffer
    return {name: tuple(t.shape) for name, t in _tensors_under(tensors, blocks).items()}


def _tensors_under(tensors: Mapping[str, torch.Tensor], blocks: Iterable[str]) -> dict:
    """`extract_submodules_state_dict`, except that the block ``""`` covers every name."""
    blocks = list(blocks)
    if "" in blocks:
        return dict(tensors)
    return extract_submodules_state_dict(tensors, blocks)


def _store_sources(
    store: TensorStore,
    names: Iterable[str],
    ties: Mapping[str, list[str]],
    written_ties: Mapping[str, str],
) -> dict[str, TensorSource]:
    """name -> where ``store`` holds it: under its own name or a tied partner's (``ties``,
    from the model), else under the name a tied model wrote it (``written_ties``)."""
    sources = {}
    for name in names:
        candidates = list(ties.get(name, (name,)))
        if name in written_ties:
            candidates.append(written_ties[name])
        key = next((k for k in candidates if k in store), None)
        if key is not None:
            sources[name] = TensorSource(store, key)
    return sources


def _index_sources(
    offload_index: Mapping[str, Mapping],
    save_folder,
    ties: Mapping[str, list[str]],
    budget: int | None,
) -> dict[str, TensorSource]:
    """name -> source for accelerate's ``offload_index``: ``safetensors_file`` entries are
    served in place by mounted stores (sharing ``budget``), ``.dat`` entries from the folder."""
    safetensors_entries = {
        name: entry for name, entry in offload_index.items() if entry.get("safetensors_file")
    }
    sources = _safetensors_sources(safetensors_entries, budget)
    dat_entries = {n: e for n, e in offload_index.items() if n not in safetensors_entries}
    if dat_entries and save_folder is not None:  # without a folder they cannot be read
        dat_files = OffloadedWeightsLoader(save_folder=save_folder, index=dat_entries)
        sources.update({name: TensorSource(dat_files, name) for name in dat_entries})
    for name, candidates in ties.items():  # a tied name the index lacks: its partner's entry
        if name not in sources:
            partner = next((c for c in candidates if c in sources), None)
            if partner is not None:
                sources[name] = sources[partner]
    return sources


def _safetensors_sources(
    entries: Mapping[str, Mapping], budget: int | None
) -> dict[str, TensorSource]:
    """Mounts the files of ``safetensors_file`` entries (as few stores as names allow: a
    store cannot hold two tensors of one name) and maps each entry into them. The stores
    share ``budget`` in proportion to the bytes of their files."""
    files = sorted({entry["safetensors_file"] for entry in entries.values()})
    groups: list[tuple[list[str], set[str]]] = []  # (files, tensor names) per store
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
        group = next((g for g in groups if not g[1] & keys), None)
        if group is None:
            groups.append(([path], keys))
        else:
            group[0].append(path)
            group[1].update(keys)
    store_of = {}
    total_bytes = sum(map(os.path.getsize, files)) or 1
    for group_files, _ in groups:
        share = None
        if budget is not None:
            share = budget * sum(map(os.path.getsize, group_files)) // total_bytes
        store = TensorStore.mount(group_files, max_resident=share)
        store_of.update(dict.fromkeys(group_files, store))
    return {
        name: TensorSource(
            store_of[entry["safetensors_file"]],
            entry.get("weight_name", name),
            getattr(torch, entry["dtype"]) if "dtype" in entry else None,
        )
        for name, entry in entries.items()
    }


def _check_sources(
    needed: Mapping[str, tuple[int, ...]], sources: Mapping[str, TensorSource], where
) -> None:
    """Raises a ValueError naming every needed tensor ``sources`` lack or hold in another
    shape (accelerate silently used whatever an existing folder held)."""
    missing = [name for name in needed if name not in sources]
    mismatched = [
        f"'{name}' is {list(shape)} there but {list(needed[name])} in the model"
        for name, shape in ((n, _source_shape(s)) for n, s in sources.items() if n in needed)
        if tuple(shape) != needed[name]
    ]
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} tensor(s) the model needs: {_name_list(missing)}")
    if mismatched:
        problems.append("shapes differ: " + "; ".join(mismatched[:_NAMES_SHOWN]))
    raise ValueError(
        f"the offloaded weights in {where} do not match the model: {'; '.join(problems)}. "
        "Check that they belong to this model; an empty offload_dir makes bigmodel write the "
        "model's weights there again."
    )


def _source_shape(source: TensorSource) -> tuple[int, ...]:
    info = getattr(source.store, "info", None)
    if info is not None:
        return tuple(info(source.key)["shape"])
    index = getattr(source.store, "index", None)  # OffloadedWeightsLoader: no read needed
    if index is not None and "shape" in index.get(source.key, {}):
        return tuple(index[source.key]["shape"])
    return tuple(source.store[source.key].shape)


def _name_list(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(f"'{name}'" for name in names[:_NAMES_SHOWN])
    hidden = len(names) - _NAMES_SHOWN
    return shown if hidden <= 0 else f"{shown} and {hidden} more"
