"""Finding a checkpoint's files and reading them: whole (`load_state_dict`) or lazily, tensor
by tensor (`CheckpointReader`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file as safe_load_file

from bigmodel import _core
from bigmodel.planning.checks import device_of
from bigmodel.store import TensorStore

logger = logging.getLogger("bigmodel.loading")  # the logger of bigmodel.loading's modules

WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"


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


def check_safetensors_format(checkpoint_file: str) -> None:
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
    check_safetensors_format(checkpoint_file)
    if device_map is None:
        return safe_load_file(checkpoint_file)
    devices = {_loadable_device(device) for device in device_map.values()}
    if len(devices) == 1:
        return safe_load_file(checkpoint_file, device=devices.pop())
    tensors = {}
    with safe_open(checkpoint_file, framework="pt") as f:
        names_by_device: dict[object, list[str]] = {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            device = device_of(name, device_map)
            device = "cpu" if device is None else _loadable_device(device)
            names_by_device.setdefault(device, []).append(name)
    for device, names in names_by_device.items():
        with safe_open(checkpoint_file, framework="pt", device=device) as f:
            tensors.update((name, f.get_tensor(name)) for name in names)
    return tensors


@dataclass(frozen=True)
class CheckpointTensor:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    # The safetensors file that holds the tensor's bytes as they are, so the offload store can
    # serve it in place; None when it must be written (torch files, compressed tensors).
    mount_file: str | None


class CheckpointReader:
    """Every tensor of a checkpoint, without reading any data up front.

    Safetensors files are mounted (zero-copy views of the file) and bigmodel stores opened;
    torch files are loaded with ``mmap=True`` so a tensor's bytes are only read when used.
    ``catalog`` holds each name's file, dtype and shape; a name present in several files
    comes from the last one, as when accelerate loads the shards in order.
    """

    def __init__(self, files: Iterable[str]):
        self._sources: dict[str, Mapping[str, torch.Tensor]] = {}
        self.catalog: dict[str, CheckpointTensor] = {}
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
        check_safetensors_format(path)
        return TensorStore.mount([path], **views)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files from the legacy (non-zip) torch.save format cannot be mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}


def _describe(source: Mapping[str, torch.Tensor], name: str, path: str) -> CheckpointTensor:
    if isinstance(source, TensorStore):
        info = source.info(name)
        in_place = info["codec"] == "none" and info["file"].endswith(".safetensors")
        mount_file = info["file"] if in_place else None
        return CheckpointTensor(path, info["dtype"], tuple(info["shape"]), mount_file)
    tensor = source[name]
    return CheckpointTensor(path, tensor.dtype, tuple(tensor.shape), mount_file=None)
