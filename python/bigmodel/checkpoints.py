"""Opening whatever a user points at as a mapping of tensors, for the command line.

A store directory is opened; safetensors files and accelerate offload folders are mounted
in place (nothing copied); ``.bin``/``.pt`` checkpoints are memory-mapped by ``torch.load``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from bigmodel import _core
from bigmodel.store import TensorStore

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def open_store(path: str | os.PathLike) -> TensorStore:
    """A store directory, an accelerate offload folder, or safetensors files, as a TensorStore."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such store, file or folder", str(path))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: not a store; expected a store directory, a .safetensors file "
                "or an accelerate offload folder"
            )
        return TensorStore.mount([path])
    if (path / _core.INDEX_FILE).exists():
        return TensorStore.open(path)
    if (path / "index.json").exists():
        return TensorStore.mount(path)
    shards = _safetensors_shards(path)
    if shards:
        return TensorStore.mount(shards)
    # No index and no shards: let the store say whether this is an interrupted write.
    return TensorStore.open(path)


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
    """The shard files named by a sharded checkpoint's ``*.index.json``, if there is one."""
    for index in sorted(folder.glob("*.index.json")):
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values() if f.endswith(suffix)})
        if files:
            return files
    return None


def _safetensors_shards(folder: Path) -> list[Path]:
    return _shards_from_index(folder, ".safetensors") or sorted(folder.glob("*.safetensors"))


def _torch_shards(folder: Path) -> list[Path]:
    listed = _shards_from_index(folder, ".bin")
    return listed or sorted(p for s in _TORCH_SUFFIXES for p in folder.glob(f"*{s}"))


class TorchCheckpoint(Mapping[str, torch.Tensor]):
    """``.bin`` shards as one read-only mapping; one shard is memory-mapped at a time."""

    def __init__(self, shards: list[Path]):
        self.location = ", ".join(map(str, shards))
        self._shard_of: dict[str, Path] = {}
        for shard in shards:
            for name in self._load(shard):
                self._shard_of[name] = shard
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None

    @staticmethod
    def _load(shard: Path) -> dict[str, torch.Tensor]:
        return torch.load(shard, map_location="cpu", weights_only=True, mmap=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        if self._current is None or self._current[0] != shard:
            self._current = (shard, self._load(shard))
        return self._current[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard_of)

    def __len__(self) -> int:
        return len(self._shard_of)

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self._current = None
