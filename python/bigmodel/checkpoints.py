"""Opening whatever a user points at as a mapping of tensors, for the command line.

A store directory is opened; safetensors files and accelerate offload folders are mounted
in place (nothing copied); ``.bin``/``.pt`` checkpoints are read by ``torch.load`` with
``weights_only=True`` (memory-mapped when the file allows it), so no pickled code runs.

Errors come in two kinds: :class:`NotAStoreError` when the path is not something bigmodel
reads (bad input), and the store's own errors (``StoreError``, ``OSError``) when it is one
but its files are damaged. For a store or offload folder whose files are missing or
truncated, :func:`read_listing` still lists the tensors from the index alone.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bigmodel import _core
from bigmodel.store import _TORCH_DTYPES, TensorStore

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
OFFLOAD_INDEX_FILE = "index.json"  # accelerate's offload folders
# Keys under which training scripts save a model's state dict next to other things, most
# specific first: {"state_dict": ..., "epoch": 3}, {"model": ..., "optimizer": ...}.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")


class NotAStoreError(ValueError):
    """The path is not a store, a checkpoint or an offload folder (bad input)."""


class CheckpointReadError(ValueError):
    """A PyTorch checkpoint that cannot be read as a state dict; one line naming the file."""


def open_store(path: str | os.PathLike) -> TensorStore:
    """A store directory, an accelerate offload folder, or safetensors files, as a TensorStore."""
    path = Path(path)
    if not path.exists():
        raise NotAStoreError(f"{path}: no such store, file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise NotAStoreError(
                f"{path}: not a store; expected a store directory, a .safetensors file "
                "or an accelerate offload folder"
            )
        return TensorStore.mount([path])
    if (path / _core.INDEX_FILE).exists():
        return TensorStore.open(path)
    if (path / OFFLOAD_INDEX_FILE).exists():
        return TensorStore.mount(path)
    shards = _safetensors_shards(path)
    if shards:
        return TensorStore.mount(shards)
    try:  # No index and no shards: let the store say whether a write was interrupted here.
        return TensorStore.open(path)
    except FileNotFoundError:
        raise NotAStoreError(
            f"{path}: not a store: no {_core.INDEX_FILE}, no offload {OFFLOAD_INDEX_FILE} "
            "and no .safetensors files"
        ) from None


def open_source(path: str | os.PathLike) -> TensorStore | TorchCheckpoint:
    """Like :func:`open_store`, and also ``.bin``/``.pt`` checkpoints (single or sharded)."""
    path = Path(path)
    if path.is_file() and path.suffix in _TORCH_SUFFIXES:
        return TorchCheckpoint([path])
    if path.is_dir() and not (path / _core.INDEX_FILE).exists():
        torch_shards = _torch_shards(path)
        if torch_shards and not _safetensors_shards(path):
            return TorchCheckpoint(torch_shards)
    return open_store(path)


def _shards_from_index(folder: Path, suffix: str) -> list[Path] | None:
    """The shard files named by a sharded checkpoint's ``*.index.json``, if there is one.

    Raises FileNotFoundError naming the shards the index lists that are not there."""
    for index in sorted(folder.glob("*.index.json")):
        if index.name == _core.INDEX_FILE:
            continue
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            raise NotAStoreError(f"{index}: not a sharded checkpoint's index") from None
        files = sorted({folder / f for f in weight_map.values() if f.endswith(suffix)})
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(
                2, f"{index} lists shard files that are missing: {', '.join(absent)}", absent[0]
            )
        if files:
            return files
    return None


def _safetensors_shards(folder: Path) -> list[Path]:
    return _shards_from_index(folder, ".safetensors") or sorted(folder.glob("*.safetensors"))


def _torch_shards(folder: Path) -> list[Path]:
    listed = _shards_from_index(folder, ".bin")
    return listed or sorted(p for s in _TORCH_SUFFIXES for p in folder.glob(f"*{s}"))


# --------------------------------------------------------------------------------------
# PyTorch checkpoints
# --------------------------------------------------------------------------------------


class TorchCheckpoint(Mapping[str, torch.Tensor]):
    """``.bin`` shards as one read-only mapping; one shard is loaded at a time.

    Each shard may be a state dict, or hold one under a key such as ``"state_dict"`` next to
    other things (``{"state_dict": ..., "epoch": 3}``): ``notes`` then says what was taken.
    """

    def __init__(self, shards: list[Path]):
        self.location = ", ".join(map(str, shards))
        self.notes: list[str] = []
        self._shard_of: dict[str, Path] = {}
        for shard in shards:
            tensors, note = _state_dict_in(_torch_load(shard), shard)
            if note:
                self.notes.append(note)
            self._shard_of.update(dict.fromkeys(tensors, shard))
        # Writers read from two threads: the lock keeps them from loading a shard twice.
        self._lock = threading.Lock()
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        with self._lock:
            if self._current is None or self._current[0] != shard:
                self._current = (shard, _state_dict_in(_torch_load(shard), shard)[0])
            return self._current[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard_of)

    def __len__(self) -> int:
        return len(self._shard_of)

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self._current = None


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)``: memory-mapped, or read whole for files in the
    legacy (non-zip) format. Any failure becomes one line naming the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "Python objects"
        raise CheckpointReadError(
            f"{path}: not a plain state dict: it pickles {what}, and bigmodel only loads "
            "tensors (torch.load weights_only=True runs no pickled code); save "
            "model.state_dict() instead"
        ) from None
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # torch.load fails in many ways on damaged files
        first_sentence = str(err).strip().split(". ")[0].splitlines()[0] if str(err) else ""
        reason = f"{type(err).__name__}: {first_sentence}".removesuffix(": ")
        raise CheckpointReadError(
            f"{path}: cannot be read as a PyTorch checkpoint (truncated or damaged?): {reason}"
        ) from None


def _state_dict_in(loaded: object, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a loaded checkpoint, and a note when they were not the whole file."""
    if not isinstance(loaded, Mapping):
        raise CheckpointReadError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict (names -> tensors)"
        )
    tensors = _tensors_of(loaded)
    others = [str(key) for key in loaded if key not in tensors]
    if tensors:
        note = f"{path}: skipped {len(others)} entries that are not tensors: {_few(others)}"
        return tensors, note if others else None
    nested = [key for key, value in loaded.items() if _tensors_of(value)]
    preferred = [key for key in _STATE_DICT_KEYS if key in nested]
    if len(nested) != 1 and not preferred:
        found = f"state dicts under the keys {_few(nested)}" if nested else "no tensors"
        raise CheckpointReadError(f"{path}: holds {found}; expected one state dict")
    key = preferred[0] if preferred else nested[0]
    rest = [str(other) for other in loaded if other != key]
    note = f"{path}: took the state dict under the key {key!r}"
    return _tensors_of(loaded[key]), note + (f" (not packed: {_few(rest)})" if rest else "")


def _tensors_of(value: object) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _few(names: list, shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(str(name)) for name in names[:shown]) + more


# --------------------------------------------------------------------------------------
# Listing a damaged store from its index alone
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileProblem:
    path: str
    problem: str  # "is missing", "is 100 bytes, 4000 expected (truncated?)"
    tensors: tuple[str, ...]

    def __str__(self) -> str:
        return f"file {self.path} {self.problem}; it holds {_few(list(self.tensors))}"


class IndexListing:
    """The tensors an index lists, read without opening their files: what ``inspect`` and
    ``ls`` show of a store whose files are missing or truncated. Offers the parts of
    :class:`TensorStore` they read (names, ``info``, ``files``, ``location``)."""

    def __init__(self, location: str, entries: dict[str, dict], files: list[dict]):
        self.location = location
        self._entries = entries
        self._files = files
        self.problems = _file_problems(entries, files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> dict:
        return self._entries[name]

    def files(self) -> list[dict]:
        return self._files

    def __enter__(self) -> IndexListing:
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def read_listing(path: str | os.PathLike) -> IndexListing | None:
    """The listing of a store directory or accelerate offload folder from its index, or
    None when ``path`` is neither or its index itself cannot be read."""
    path = Path(path)
    try:
        if (path / _core.INDEX_FILE).is_file():
            return _store_listing(path)
        if (path / OFFLOAD_INDEX_FILE).is_file():
            return _offload_listing(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # the index is damaged too: the caller reports the original error
    return None


def _store_listing(folder: Path) -> IndexListing:
    index = json.loads((folder / _core.INDEX_FILE).read_text())
    files = [
        {
            "path": record["path"] if record.get("mounted") else str(folder / record["path"]),
            "size": record["size"],
            "mounted": bool(record.get("mounted")),
        }
        for record in index["files"]
    ]
    entries = {
        entry["name"]: {
            "dtype": _TORCH_DTYPES[entry["dtype"]],
            "shape": tuple(entry["shape"]),
            "nbytes": entry["raw_length"],
            "stored_nbytes": entry["length"],
            "file": files[entry["file"]]["path"],
            "codec": entry["codec"],
        }
        for entry in index["tensors"]
    }
    return IndexListing(str(folder), entries, files)


def _offload_listing(folder: Path) -> IndexListing | None:
    """accelerate's ``index.json``: ``{"dtype", "shape"}`` per ``<name>.dat`` file, or a
    reference into a safetensors file (whose header gives dtype and shape)."""
    index = json.loads((folder / OFFLOAD_INDEX_FILE).read_text())
    entries, sizes = {}, {}
    for name, info in index.items():
        if "safetensors_file" in info:
            file = info["safetensors_file"]
            if not os.path.isfile(file):
                return None  # dtype and shape are in the missing file's header
            with safe_open(file, framework="pt") as handle:
                tensor = handle.get_slice(info.get("weight_name") or name)
                dtype, shape = _TORCH_DTYPES[tensor.get_dtype()], tuple(tensor.get_shape())
            sizes[file] = os.path.getsize(file)
        else:
            file = str(folder / f"{name}.dat")
            dtype, shape = getattr(torch, info["dtype"]), tuple(info["shape"])
            sizes[file] = _numel(shape) * dtype.itemsize
        nbytes = _numel(shape) * dtype.itemsize
        entries[name] = {
            "dtype": dtype,
            "shape": shape,
            "nbytes": nbytes,
            "stored_nbytes": nbytes,
            "file": file,
            "codec": "none",
        }
    files = [{"path": file, "size": size, "mounted": True} for file, size in sizes.items()]
    return IndexListing(str(folder), entries, files)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for length in shape:
        count *= length
    return count


def _file_problems(entries: dict[str, dict], files: list[dict]) -> list[FileProblem]:
    """Files that are missing or whose size is not the one the index expects."""
    problems = []
    for record in files:
        path = record["path"]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            problem = "is missing"
        else:
            if size == record["size"]:
                continue
            problem = f"is {size} bytes, {record['size']} expected (truncated?)"
        tensors = tuple(name for name, info in entries.items() if info["file"] == path)
        problems.append(FileProblem(path, problem, tensors))
    return problems
