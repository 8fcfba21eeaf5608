"""The module tree as the planner sees it: children, sizes and largest layers by dotted name,
computed once per name from a `ModelScan`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from bigmodel.planning.module_sizes import ModelScan, Size

# A unit of placement: a module, or a parameter/buffer of a module that was split.
Entry = tuple[str, nn.Module | torch.Tensor]


class _SizeLookup(Mapping[str, Size]):
    """Module and tensor sizes from separate tables (a module never has a tensor's name)."""

    def __init__(self, *tables: dict[str, Size]) -> None:
        self._tables = tables

    def __getitem__(self, name: str) -> Size:
        for table in self._tables:
            size = table.get(name)
            if size is not None:
                return size
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        for table in self._tables:
            yield from table

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables)


class ModuleTree:
    """Children, sizes and largest layers of the model's modules, looked up by dotted name.

    A *layer* is what `get_max_layer_size` counts: a module without children or an instance of
    a no-split class. Results are cached by name (a module shared under two names has two
    different sizes: its tensors are counted under the first name only).
    """

    def __init__(self, module_sizes: Mapping[str, Size], no_split: Iterable[str]) -> None:
        self.sizes = module_sizes
        self._no_split = frozenset(no_split)
        self._children: dict[str, list[Entry]] = {}
        self._largest_layers: dict[str, tuple[Size, int]] = {}

    @classmethod
    def from_scan(cls, scan: ModelScan, no_split: Iterable[str]) -> ModuleTree:
        """The whole model's tree, with every module's largest layers computed up front."""
        module_sizes = scan.subtree_bytes()
        tree = cls(_SizeLookup(module_sizes, scan.parameter_bytes, scan.buffer_bytes), no_split)
        tree._children = scan.children
        # Layers are modules: their sizes are in the (smaller, plain) module table.
        tree._compute_largest_layers(scan.paths, module_sizes.get)
        return tree

    def size(self, name: str) -> Size:
        return self.sizes.get(name, 0)

    def children(self, name: str, module: nn.Module) -> list[Entry]:
        """The module's children with full names (cached).

        Unlike ``named_children()``, a module registered twice in one parent is listed under
        both names, so that the map covers both names of its tensors (accelerate skips the
        second name and then raises IndexError on the tie between the two).
        """
        children = self._children.get(name)
        if children is None:  # not scanned (public helpers): read it from the module
            prefix = f"{name}." if name else ""
            children = [
                (prefix + child, sub) for child, sub in module._modules.items() if sub is not None
            ]
            self._children[name] = children
        return children

    def is_layer(self, name: str, module: nn.Module) -> bool:
        return not self.children(name, module) or type(module).__name__ in self._no_split

    def can_split(self, name: str, obj: nn.Module | torch.Tensor) -> bool:
        return isinstance(obj, nn.Module) and not self.is_layer(name, obj)

    def split_parts(self, name: str, module: nn.Module) -> list[Entry]:
        """What a split module is replaced by: its direct parameters, then its children.

        A parameter registered under two names gets both (see `children`).
        """
        prefix = f"{name}." if name else ""
        parameters = [
            (prefix + parameter, tensor)
            for parameter, tensor in module.named_parameters(recurse=False, remove_duplicate=False)
        ]
        return parameters + self.children(name, module)

    def _compute_largest_layers(
        self, paths: list[tuple[str, nn.Module]], size_of: Callable[[str, Size], Size]
    ) -> None:
        """`largest_layers` of every module, children first (iterative: no deep recursion).

        A module with only empty layers gets ``(0, number of layers)``, as accelerate counts
        every layer of the maximum size, 0 included.
        """
        for name, module in reversed(paths):
            children = self._children.get(name)
            if not children or type(module).__name__ in self._no_split:
                self._largest_layers[name] = (size_of(name, 0), 1)
                continue
            size, count = self._largest_layers[children[0][0]]
            for child, _ in children[1:]:
                child_size, child_count = self._largest_layers[child]
                if child_size > size:
                    size, count = child_size, child_count
                elif child_size == size:
                    count += child_count
            self._largest_layers[name] = (size, count)

    def largest_layers(self, name: str) -> tuple[Size, int]:
        """``(size, count)``: the size of the largest layers under a module (computed by
        `from_scan`), and how many layers have that size."""
        return self._largest_layers[name]
