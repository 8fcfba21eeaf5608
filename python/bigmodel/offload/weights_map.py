"""`StoreWeightsMap`: the weights map of bigmodel's offload hooks.

A *weights map* is a read-only ``Mapping[str, Tensor]`` from which an offloading hook fetches
a module's weights at every forward. bigmodel's own offload paths use `StoreWeightsMap`:
tensors kept in RAM first, then, per name, the store (usually one `TensorStore`: zero-copy
views, residency cache, background prefetch) and key that serve it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import torch

from bigmodel.tensors import torch_dtype_name


class TensorSource(NamedTuple):
    """Where one weight comes from: ``store[key]``, then cast to ``dtype`` when given."""

    store: Mapping[str, torch.Tensor]
    key: str
    dtype: torch.dtype | None = None


class StoreWeightsMap(Mapping[str, torch.Tensor]):
    """The weights map of bigmodel's offload hooks.

    Args:
        state_dict: tensors held in RAM; they win over ``sources`` (as in accelerate's
            `OffloadedWeightsLoader`) and are returned as they are.
        sources: for every other name, the store (usually one `TensorStore`) and key that
            serve it. Several names may share one key: a tied tensor is stored once.

    ``prefetch(names)`` forwards to the stores that have a ``prefetch`` method, so a
    prefetcher can start the reads of the next modules without knowing where they live.
    Offloading hooks resolve each name once, with `reader`, on their first forward: give
    a hook a new map rather than changing a map's ``sources`` under it.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        sources: Mapping[str, TensorSource] | None = None,
    ):
        # Kept as given (not copied): it may be a lazy mapping.
        self.state_dict = {} if state_dict is None else state_dict
        self.sources = {
            name: source for name, source in (sources or {}).items() if name not in self.state_dict
        }

    def __deepcopy__(self, memo: dict) -> StoreWeightsMap:
        # Stores (and lazy mappings) are read-only and hold OS resources: a copy shares them.
        in_ram = self.state_dict
        copied = StoreWeightsMap(
            copy.deepcopy(in_ram, memo) if isinstance(in_ram, dict) else in_ram
        )
        copied.sources = dict(self.sources)
        return copied

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.state_dict.get(name)
        if tensor is not None:
            return tensor
        source = self.sources.get(name)
        if source is None:
            raise KeyError(name)
        value = source.store[source.key]
        return value if source.dtype is None else value.to(source.dtype)

    def reader(self, name: str) -> Callable[[], torch.Tensor]:
        """A function returning ``self[name]``, resolved once (see `TensorStore.reader`)."""
        if name in self.state_dict or name not in self.sources:
            return functools.partial(self.__getitem__, name)
        store, key, dtype = self.sources[name]
        make_reader = getattr(store, "reader", None)
        read = (
            make_reader(key)
            if make_reader is not None
            else functools.partial(store.__getitem__, key)
        )
        if dtype is None:
            return read
        return lambda: read().to(dtype)

    def __contains__(self, name: object) -> bool:
        return name in self.state_dict or name in self.sources

    def __iter__(self) -> Iterator[str]:
        yield from self.state_dict
        yield from self.sources

    def __len__(self) -> int:
        return len(self.state_dict) + len(self.sources)

    @functools.cached_property
    def index(self) -> dict[str, dict]:
        """accelerate's offload index of the store-served names, as `OffloadedWeightsLoader`
        holds it, for code written against accelerate that reads it (peft rebuilds the
        ``offload_index`` of a dispatched model from ``weights_map.dataset.index``).

        A tensor stored uncompressed in a safetensors file (a mounted checkpoint or a
        bigmodel shard) gets ``{"safetensors_file", "weight_name", "dtype"}``, one in an
        accelerate ``.dat`` file ``{"dtype", "shape"}``. Compressed tensors have no entry:
        no accelerate reader could serve them.
        """
        index = {}
        for name, source in self.sources.items():
            entry = _offload_index_entry(source)
            if entry is not None:
                index[name] = entry
        return index

    def prefetch(self, names: Iterable[str]) -> None:
        """Starts background reads of the store-served ``names``; returns at once."""
        for store, keys in self.store_keys(names):
            store.prefetch(keys)

    def stores(self) -> list[Mapping[str, torch.Tensor]]:
        """The distinct stores serving the names not held in RAM, in first-seen order."""
        return list({id(source.store): source.store for source in self.sources.values()}.values())

    def store_keys(self, names: Iterable[str]) -> list[tuple[Mapping, list[str]]]:
        """``(store, keys)`` for the store-served ``names`` that can be read ahead, grouped by
        store in first-seen order; names held in RAM are left out."""
        keys_by_store: dict[int, tuple[Mapping, list[str]]] = {}
        for name in names:
            source = self.sources.get(name)
            if source is None or not hasattr(source.store, "prefetch"):
                continue  # in RAM already, or a store that cannot read ahead
            keys_by_store.setdefault(id(source.store), (source.store, []))[1].append(source.key)
        return list(keys_by_store.values())


def _offload_index_entry(source: TensorSource) -> dict | None:
    """accelerate's offload-index entry for one store-served tensor (see
    `StoreWeightsMap.index`), or None when no accelerate reader could serve it."""
    loader_index = getattr(source.store, "index", None)  # an OffloadedWeightsLoader
    if isinstance(loader_index, Mapping):
        return loader_index.get(source.key)
    info = getattr(source.store, "info", None)
    if info is None:
        return None
    stored = info(source.key)
    if stored["codec"] != "none":
        return None
    dtype = torch_dtype_name(source.dtype or stored["dtype"])
    if stored["file"].endswith(".dat"):
        return {"dtype": dtype, "shape": list(stored["shape"])}
    return {"safetensors_file": stored["file"], "weight_name": source.key, "dtype": dtype}
