"""accelerate's offload-folder utilities and weights maps, with accelerate's behaviour.

Folders written by accelerate or transformers can be read and written::

    <folder>/index.json        {"<name>": {"dtype": "float32", "shape": [4, 3]}, ...}
    <folder>/<name>.dat        raw C-order bytes, no header (bf16 as int16, float8 as int8)

`OffloadedWeightsLoader` is accelerate's weights map over such a folder (or over safetensors
files); `PrefixedDataset` is the view an offloading hook reads under its module's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open

from bigmodel.tensors import as_torch_dtype, set_module_tensor_to_device, torch_dtype_name

INDEX_FILE = "index.json"


def offload_weight(
    weight: torch.Tensor, weight_name: str, offload_folder: str | os.PathLike, index=None
):
    """Writes ``weight`` to ``<offload_folder>/<weight_name>.dat`` (the folder must exist).

    When ``index`` (a dict) is given, records ``{"dtype", "shape"}`` for the weight in it.
    Returns ``index``. bf16 is written as its int16 bits and float8 as int8 bits (numpy has
    neither type); the index keeps the real dtype name. A 0-d tensor is written as one element
    with shape ``[]``.
    """
    raw, dtype_name = _as_numpy(weight)
    if index is not None:
        index[weight_name] = {"dtype": dtype_name, "shape": list(weight.shape)}
    # 0-d arrays are written as one element, as accelerate's memmap did.
    np.ascontiguousarray(raw).reshape(-1).tofile(os.path.join(offload_folder, f"{weight_name}.dat"))
    return index


def _as_numpy(weight: torch.Tensor) -> tuple[np.ndarray, str]:
    """The tensor's bytes as a numpy array, and the dtype name the index records."""
    # Detached: accelerate refused tensors that require grad (a raw nn.Parameter).
    weight = weight.detach().cpu()
    dtype_name = torch_dtype_name(weight.dtype)
    if weight.dtype == torch.bfloat16:
        return weight.view(torch.int16).numpy(), dtype_name
    if dtype_name.startswith("float8_"):
        return weight.view(torch.int8).numpy(), dtype_name
    array = weight.numpy()
    return array, str(array.dtype)


def load_offloaded_weight(weight_file: str | os.PathLike, weight_info: Mapping) -> torch.Tensor:
    """Reads a ``.dat`` file written by `offload_weight` into a new CPU tensor (a copy).

    ``weight_info`` is the weight's index entry (``dtype`` and ``shape``).
    """
    shape = tuple(weight_info["shape"])
    dtype_name = weight_info["dtype"]
    if dtype_name == "bfloat16":
        numpy_dtype = np.dtype("int16")
    elif dtype_name.startswith("float8_"):
        numpy_dtype = np.dtype("int8")
    else:
        numpy_dtype = np.dtype(dtype_name)
    count = int(np.prod(shape, dtype=np.int64))  # 1 for a 0-d tensor
    expected_bytes = count * numpy_dtype.itemsize
    actual_bytes = os.path.getsize(weight_file)
    if actual_bytes < expected_bytes:
        raise ValueError(
            f"{weight_file} holds {actual_bytes} bytes but its index entry ({dtype_name}, shape "
            f"{list(shape)}) needs {expected_bytes}: the offload folder is truncated or stale"
        )
    array = np.fromfile(weight_file, dtype=numpy_dtype, count=count)
    tensor = torch.from_numpy(array).reshape(shape)
    if numpy_dtype.name != dtype_name:  # bf16 / float8: reinterpret the bits
        tensor = tensor.view(as_torch_dtype(dtype_name))
    return tensor


def save_offload_index(index: Mapping | None, offload_folder: str | os.PathLike) -> None:
    """Merges ``index`` into ``<offload_folder>/index.json`` (created when absent).

    An empty or None index writes nothing.
    """
    if not index:
        return
    index_file = os.path.join(offload_folder, INDEX_FILE)
    merged = {}
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            merged = json.load(f)
    merged.update(index)
    with open(index_file, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)


def offload_state_dict(save_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Writes every tensor of ``state_dict`` as a ``.dat`` file in ``save_dir`` (created if
    needed) and merges their entries into its ``index.json``."""
    os.makedirs(save_dir, exist_ok=True)
    index: dict = {}
    for name, tensor in state_dict.items():
        offload_weight(tensor, name, save_dir, index=index)
    save_offload_index(index, save_dir)


class PrefixedDataset(Mapping):
    """A view of ``dataset`` where key ``k`` reads ``dataset[prefix + k]``.

    Kept exactly as accelerate's (code in the wild relies on it): iteration yields the
    *full, still-prefixed* keys of the underlying dataset that start with the prefix, and
    ``len`` is the length of the whole underlying dataset.
    """

    def __init__(self, dataset: Mapping, prefix: str):
        self.dataset = dataset
        self.prefix = prefix

    def __getitem__(self, key: str):
        return self.dataset[f"{self.prefix}{key}"]

    def __iter__(self) -> Iterator[str]:
        return iter([key for key in self.dataset if key.startswith(self.prefix)])

    def __len__(self) -> int:
        return len(self.dataset)


def unwrap_prefixes(weights_map: Mapping | None) -> tuple[Mapping | None, str]:
    """The mapping under nested prefixed views, and the prefix they add together.

    A prefixed view is recognised by what it has, a ``dataset`` and a string ``prefix``:
    `PrefixedDataset`, and accelerate's own class of that name, which behaves the same.
    """
    prefix = ""
    while isinstance(getattr(weights_map, "prefix", None), str) and hasattr(weights_map, "dataset"):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    return weights_map, prefix


class OffloadedWeightsLoader(Mapping):
    """accelerate's weights map: a state dict in RAM first, then an offload index.

    Args:
        state_dict: tensors returned as they are; they win over the index.
        save_folder: folder of the ``.dat`` files; its ``index.json`` is read now when
            ``index`` is None.
        index: name -> ``{"dtype", "shape"}`` (a ``.dat`` file in ``save_folder``) or
            ``{"safetensors_file", "weight_name"?, "dtype"?}`` (read from that file).
        device: where safetensors entries are materialised (default CPU).
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        save_folder: str | os.PathLike | None = None,
        index: Mapping | None = None,
        device=None,
    ):
        if state_dict is None and save_folder is None and index is None:
            raise ValueError(
                "Need either a `state_dict`, a `save_folder` or an `index` containing offloaded "
                "weights."
            )
        self.state_dict = {} if state_dict is None else state_dict
        self.save_folder = save_folder
        if index is None and save_folder is not None:
            with open(os.path.join(save_folder, INDEX_FILE)) as f:
                index = json.load(f)
        self.index = {} if index is None else index
        self.all_keys = list(self.state_dict)
        known = set(self.all_keys)
        self.all_keys.extend(key for key in self.index if key not in known)
        self.device = device

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.state_dict:
            return self.state_dict[key]
        weight_info = self.index[key]
        if weight_info.get("safetensors_file") is not None:
            return self._read_safetensors(key, weight_info)
        return load_offloaded_weight(os.path.join(self.save_folder, f"{key}.dat"), weight_info)

    def _read_safetensors(self, key: str, weight_info: Mapping) -> torch.Tensor:
        device = "cpu" if self.device is None else self.device
        file_key = weight_info.get("weight_name", key)
        try:
            with safe_open(weight_info["safetensors_file"], framework="pt", device=device) as f:
                tensor = f.get_tensor(file_key)
        except TypeError:  # the device cannot hold that dtype (bf16 on MPS): read on CPU
            with safe_open(weight_info["safetensors_file"], framework="pt", device="cpu") as f:
                tensor = f.get_tensor(file_key)
        if "dtype" in weight_info:
            tensor = tensor.to(as_torch_dtype(weight_info["dtype"]))
        if tensor.device != torch.device(device):
            tensor = tensor.to(device)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.all_keys)

    def __len__(self) -> int:
        return len(self.all_keys)


def extract_submodules_state_dict(
    state_dict: Mapping[str, torch.Tensor], submodule_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that belong to the named submodules (no copies).

    A key belongs to ``name`` when it equals it or starts with ``name + "."`` (so ``h.1``
    does not capture ``h.10``). As in accelerate, the name ``""`` matches nothing.
    """
    result = {}
    for module_name in submodule_names:
        prefix = module_name + "."
        result.update(
            {
                key: tensor
                for key, tensor in state_dict.items()
                if key == module_name or key.startswith(prefix)
            }
        )
    return result


def load_offloaded_weights(model: torch.nn.Module, index: Mapping | None, offload_folder) -> None:
    """Loads every weight of ``index`` from ``offload_folder``'s ``.dat`` files into ``model``
    on CPU. bitsandbytes ``SCB`` statistics are attached to their weight."""
    if not index:
        return
    for name, info in index.items():
        if "SCB" in name:
            continue
        statistics = None
        statistics_name = name.replace("weight", "SCB")
        if "weight" in name and statistics_name in index:
            statistics = load_offloaded_weight(
                os.path.join(offload_folder, f"{statistics_name}.dat"), index[statistics_name]
            )
        weight = load_offloaded_weight(os.path.join(offload_folder, f"{name}.dat"), info)
        set_module_tensor_to_device(model, name, "cpu", value=weight, fp16_statistics=statistics)
