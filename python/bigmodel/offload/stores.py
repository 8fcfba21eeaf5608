"""The disk store of an offload folder, and where each offloaded name is served from.

Every weight that lives on disk is served by ONE bigmodel store in the offload folder:

- a folder holding a bigmodel store (its index file, including "mount" stores that point
  at a checkpoint's safetensors files in place) is opened as it is;
- a folder written by accelerate or transformers (``index.json`` + ``.dat`` files) is mounted
  in place, nothing copied;
- otherwise the weights are written there as a store (never as ``.dat`` files); a tensor tied
  between modules is written once, and its other names are recorded beside the store
  (``bigmodel.ties.json``), so that an untied instance of the same model can reuse the folder.

Unlike accelerate, an existing folder is checked against the model before it is used: a
missing tensor or a shape mismatch raises a `ValueError` naming it. A store that loading has
just committed for the model (`CommittedStore`) needs neither the discovery nor the check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from bigmodel import _core
from bigmodel.errors import NAMES_SHOWN, name_list
from bigmodel.offload.folders import INDEX_FILE as ACCELERATE_INDEX_FILE
from bigmodel.offload.folders import OffloadedWeightsLoader, extract_submodules_state_dict
from bigmodel.offload.weights_map import TensorSource
from bigmodel.store import TensorStore, write_store
from bigmodel.tensors import as_torch_dtype, offloaded_tensors

STORE_INDEX_FILE = _core.INDEX_FILE  # a bigmodel store (written or mount)
# Beside a store that bigmodel wrote from a model with tied tensors: each tied name that was
# not written -> the name its tensor was written under, so an untied twin can reuse the store.
WRITTEN_TIES_FILE = "bigmodel.ties.json"


@dataclass(frozen=True)
class CommittedStore:
    """A store that loading committed in an offload folder for the model it loaded, with the
    key that serves each model tensor routed to it (its own name, a tied partner's, or the
    checkpoint's name when the store mounts the checkpoint's files)."""

    folder: str
    keys: Mapping[str, str]

    def sources(self, budget: int | None) -> dict[str, TensorSource]:
        """Opens the store (its cache holding up to ``budget`` bytes) and gives each name
        its source in it."""
        store = TensorStore.open(self.folder, max_resident=budget)
        return {name: TensorSource(store, key) for name, key in self.keys.items()}


def sources_in_folder(
    offload_dir: str | os.PathLike,
    needed: Mapping[str, tuple[int, ...]],
    ties: Mapping[str, list[str]],
    tensors_to_write: Callable[[], Mapping[str, torch.Tensor]],
    budget: int | None,
) -> dict[str, TensorSource]:
    """The source of each ``needed`` name (name -> shape in the model) in the store of
    ``offload_dir`` (opened, mounted, or written from ``tensors_to_write()``), checked."""
    store = _disk_store(offload_dir, tensors_to_write, budget)
    sources = _store_sources(store, needed, ties, _written_ties(offload_dir))
    check_sources(needed, sources, os.fspath(offload_dir))
    return sources


def sources_in_index(
    offload_index: Mapping[str, Mapping],
    save_folder: str | os.PathLike | None,
    needed: Mapping[str, tuple[int, ...]],
    ties: Mapping[str, list[str]],
    budget: int | None,
) -> dict[str, TensorSource]:
    """name -> source for accelerate's ``offload_index``, checked against ``needed``:
    ``safetensors_file`` entries are served in place by mounted stores (sharing ``budget``),
    ``.dat`` entries from ``save_folder``."""
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
    check_sources(needed, sources, "the offload_index")
    return sources


def fetched_tensors(
    model: nn.Module, blocks: Iterable[str], offload_buffers: bool
) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the offload hooks of ``blocks`` fetch from their weights
    map (see `offloaded_tensors`), under each of its names."""
    tensors = dict(offloaded_tensors(model, offload_buffers, recurse=True, remove_duplicate=False))
    return {name: tuple(t.shape) for name, t in tensors_under(tensors, blocks).items()}


def tensors_under(tensors: Mapping[str, torch.Tensor], blocks: Iterable[str]) -> dict:
    """`extract_submodules_state_dict`, except that the block ``""`` covers every name."""
    blocks = list(blocks)
    if "" in blocks:
        return dict(tensors)
    return extract_submodules_state_dict(tensors, blocks)


def tie_candidates(model: nn.Module) -> dict[str, list[str]]:
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


def _disk_store(
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
            f"cannot offload {name_list(on_meta)} to {os.fspath(offload_dir)}: on the meta "
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
    """The ties `_disk_store` recorded beside the store it wrote (empty if none)."""
    path = os.path.join(offload_dir, WRITTEN_TIES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
            as_torch_dtype(entry["dtype"]) if "dtype" in entry else None,
        )
        for name, entry in entries.items()
    }


def check_sources(
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
        problems.append(f"it lacks {len(missing)} tensor(s) the model needs: {name_list(missing)}")
    if mismatched:
        problems.append("shapes differ: " + "; ".join(mismatched[:NAMES_SHOWN]))
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
