"""Sizes of a model's modules and tensors, from shapes and dtypes alone (meta models work).

`ModelScan` walks a model once and collects what planning needs (its modules, tensors, tied
names and sizes); `compute_module_sizes` and the other accelerate functions here are views of
such a scan. Results match accelerate 1.15, including its fractional size of bool tensors
(1/8 byte per element).
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from bigmodel.tensors import as_torch_dtype, keeps_own_dtype

Size = int | float  # bool tensors make sizes fractional (1/8 byte per element)
DeviceKey = int | str
DtypeLike = str | torch.dtype

_FLOAT8_NAMES = (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
_FLOAT8_DTYPES = frozenset(getattr(torch, name) for name in _FLOAT8_NAMES if hasattr(torch, name))
# Sizes of accelerate's `CustomDtype` members (an Enum), recognised by their values.
_CUSTOM_DTYPE_SIZES = {"int2": 0.25, "int4": 0.5, "fp8": 1}


def dtype_byte_size(dtype: torch.dtype) -> Size:
    """Bytes taken by one element of ``dtype``: 4 for float32, 1/8 for bool, 1 for float8.

    Raises:
        ValueError: the dtype's name does not end with its bit width.
    """
    if dtype == torch.bool:
        return 1 / 8
    if isinstance(dtype, enum.Enum) and dtype.value in _CUSTOM_DTYPE_SIZES:
        return _CUSTOM_DTYPE_SIZES[dtype.value]
    if dtype in _FLOAT8_DTYPES:
        return 1
    bits = re.search(r"[^\d](\d+)$", str(dtype))
    if bits is None:
        raise ValueError(f"`dtype` is not a valid dtype: {dtype}.")
    return int(bits.group(1)) // 8


class ModelScan:
    """The modules, tensors and sizes of a model, collected in one walk.

    Planning needs several listings of a model (sizes, tied parameters, the module tree). On
    models with tens of thousands of modules each torch listing costs tens of milliseconds, so
    one walk over ``_modules``, ``_parameters`` and ``_buffers`` (what torch's listings read)
    collects them all, with torch's names, order and duplicate rules, and sizes every tensor
    with the dtype rules of `compute_module_sizes`.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: DtypeLike | None = None,
        special_dtypes: Mapping[str, DtypeLike] | None = None,
    ) -> None:
        self.dtype, self.special_dtypes = dtype, special_dtypes  # what the sizes assume
        self._sizer = _TensorSizer(dtype, special_dtypes)
        # named_modules(remove_duplicate=False): a shared module appears once per name.
        self.paths: list[tuple[str, nn.Module]] = []
        # Children of each module path that has some (a child registered twice, twice).
        self.children: dict[str, list[tuple[str, nn.Module]]] = {}
        # named_modules(): first names only.
        self.modules: list[tuple[str, nn.Module]] = []
        # id of each parameter -> its first name (the name named_parameters() gives).
        self.first_name_of: dict[int, str] = {}
        # The other names of parameters (named_parameters(remove_duplicate=False) minus
        # named_parameters()), in walk order.
        self.parameter_aliases: list[tuple[str, torch.Tensor]] = []
        self._model = model
        # Bytes of each tensor under its first name, in named_parameters() / named_buffers()
        # order, and of the tensors each module holds directly.
        self.parameter_bytes: dict[str, Size] = {}
        self.buffer_bytes: dict[str, Size] = {}
        self._own_parameter_bytes: dict[str, Size] = {}
        self._own_buffer_bytes: dict[str, Size] = {}
        self._walk(model)

    def every_parameter_name(self) -> list[str]:
        """The names ``named_parameters(remove_duplicate=False)`` gives, in its order."""
        if not self.parameter_aliases:
            return list(self.parameter_bytes)
        return [name for name, _ in self._model.named_parameters(remove_duplicate=False)]

    def _walk(self, model: nn.Module) -> None:
        seen_modules: set[int] = set()
        # (module path, first visit, tensors) of the modules holding parameters / buffers,
        # sized afterwards in one loop each (cheaper than a call per module).
        holding_parameters: list[tuple[str, bool, dict[str, torch.Tensor | None]]] = []
        holding_buffers: list[tuple[str, bool, dict[str, torch.Tensor | None]]] = []
        add_path, add_module, children_of = self.paths.append, self.modules.append, self.children
        stack = [("", model)]
        while stack:
            entry = stack.pop()
            path, module = entry
            add_path(entry)
            attributes = module.__dict__  # one attribute lookup instead of three
            children = attributes["_modules"]
            if children:
                prefix = f"{path}." if path else ""
                listed = [(prefix + n, child) for n, child in children.items() if child is not None]
                children_of[path] = listed
                stack.extend(reversed(listed))
            # named_modules() skips a module met before, with its whole subtree (the modules
            # below it were all met before too, under their first names); so do the listings.
            first_visit = id(module) not in seen_modules
            if first_visit:
                seen_modules.add(id(module))
                add_module(entry)
            if attributes["_parameters"]:
                holding_parameters.append((path, first_visit, attributes["_parameters"]))
            if first_visit and attributes["_buffers"]:
                holding_buffers.append((path, True, attributes["_buffers"]))
        self._size_tensors(
            holding_parameters,
            self.parameter_bytes,
            self._own_parameter_bytes,
            self.first_name_of,
            self.parameter_aliases,
        )
        self._size_tensors(holding_buffers, self.buffer_bytes, self._own_buffer_bytes, {}, [])

    def _size_tensors(
        self,
        holders: list[tuple[str, bool, dict[str, torch.Tensor | None]]],
        sizes: dict[str, Size],
        own_sizes: dict[str, Size],
        first_name_of: dict[int, str],
        aliases: list[tuple[str, torch.Tensor]],
    ) -> None:
        """Sizes the tensors of ``holders`` under their first names; others are aliases."""
        size_of = self._sizer.size_of
        # Without special dtypes, a tensor's size depends on its dtype only: look up the
        # bytes per element here instead of calling size_of for every tensor.
        per_element = {} if self._sizer.special_sizes else self._sizer.per_element
        for path, first_visit, tensors in holders:
            prefix = f"{path}." if path else ""
            own_bytes: Size = 0
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                full_name = prefix + name
                key = id(tensor)
                if not first_visit or key in first_name_of:
                    aliases.append((full_name, tensor))
                    continue
                first_name_of[key] = full_name
                element_size = per_element.get(tensor.dtype)
                if element_size is None:
                    size = size_of(full_name, tensor)
                else:
                    size = tensor.numel() * element_size
                sizes[full_name] = size
                own_bytes += size
            if first_visit:  # every sized tensor's module gets a total, even of 0 bytes
                own_sizes[path] = own_sizes.get(path, 0) + own_bytes

    def subtree_bytes(self, buffers_only: bool = False) -> dict[str, Size]:
        """Bytes under each module path (first names), its own tensors and all below.

        Sums are exact whatever their order: sizes are multiples of 1/8 byte.
        """
        totals = dict(self._own_buffer_bytes)
        if not buffers_only:
            for path, size in self._own_parameter_bytes.items():
                totals[path] = totals.get(path, 0) + size
        for path, _ in reversed(self.modules):  # children before their parent
            if path and path in totals:
                parent = path.rpartition(".")[0]
                totals[parent] = totals.get(parent, 0) + totals[path]
        return totals

    def module_sizes(self, buffers_only: bool = False) -> defaultdict[str, Size]:
        """`compute_module_sizes` for the scanned model (same values, same key order)."""
        totals = self.subtree_bytes(buffers_only)
        # accelerate lists, for each tensor in order, its not yet listed parents (outermost
        # first) then the tensor. A listed parent has all its own parents listed already.
        sizes: defaultdict[str, Size] = defaultdict(int)
        tensor_bytes = list(self.buffer_bytes.items())
        if not buffers_only:
            tensor_bytes = list(self.parameter_bytes.items()) + tensor_bytes
        for name, size in tensor_bytes:
            unlisted = []
            parent = name.rpartition(".")[0]
            while parent not in sizes:
                unlisted.append(parent)
                if not parent:
                    break
                parent = parent.rpartition(".")[0]
            for parent in reversed(unlisted):
                sizes[parent] = totals[parent]
            sizes[name] = size
        return sizes


def compute_module_sizes(
    model: nn.Module,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    buffers_only: bool = False,
) -> defaultdict[str, Size]:
    """Bytes taken by every submodule and tensor of ``model``, keyed by dotted name.

    Args:
        model: the model (meta tensors are fine: only shapes and dtypes are read).
        dtype: the dtype the weights will be loaded in. It never makes a tensor bigger, and
            integer/bool tensors keep their own size.
        special_dtypes: per-tensor dtypes (full tensor names), winning over ``dtype``.
        buffers_only: count buffers only.

    Returns a ``defaultdict(int)``: ``""`` holds the total, each module and tensor its own
    size. Tied parameters are counted once; non-persistent buffers are counted.
    """
    return ModelScan(model, dtype, special_dtypes).module_sizes(buffers_only)


class _TensorSizer:
    """Bytes of a tensor once loaded with ``dtype`` / ``special_dtypes`` (see
    `compute_module_sizes`)."""

    def __init__(self, dtype: DtypeLike | None, special_dtypes: Mapping[str, DtypeLike] | None):
        self._target_size = None if dtype is None else dtype_byte_size(as_torch_dtype(dtype))
        self.special_sizes = {
            name: dtype_byte_size(as_torch_dtype(special))
            for name, special in (special_dtypes or {}).items()
        }
        # Bytes per element of each dtype met, the target dtype applied (filled on demand).
        self.per_element: dict[torch.dtype, Size] = {}

    def size_of(self, name: str, tensor: torch.Tensor) -> Size:
        if name in self.special_sizes:
            return tensor.numel() * self.special_sizes[name]
        per_element = self.per_element.get(tensor.dtype)
        if per_element is None:
            per_element = self.per_element[tensor.dtype] = self._element_size(tensor.dtype)
        return tensor.numel() * per_element

    def _element_size(self, dtype: torch.dtype) -> Size:
        own_size = dtype_byte_size(dtype)
        if self._target_size is None or keeps_own_dtype(dtype):
            return own_size  # integer/bool tensors are never cast
        return min(self._target_size, own_size)  # a target dtype never makes a tensor bigger


def compute_module_total_buffer_size(
    model: nn.Module,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
) -> Size:
    """Total bytes of all buffers of ``model`` (same dtype rules as `compute_module_sizes`)."""
    return compute_module_sizes(model, dtype, special_dtypes, buffers_only=True).get("", 0)


def get_max_layer_size(
    modules: list[tuple[str, nn.Module | torch.Tensor]],
    module_sizes: Mapping[str, Size],
    no_split_module_classes: Iterable[str],
) -> tuple[Size, list[str]]:
    """The size of the largest layer in ``modules`` and the names of all layers of that size.

    A layer is an entry without children (tensors included) or an instance of one of
    ``no_split_module_classes``; other modules are searched depth first, in order.
    """
    no_split = set(no_split_module_classes)
    max_size: Size = 0
    layer_names: list[str] = []
    for name in _depth_first_layer_names(modules, no_split):
        size = module_sizes[name]
        if size > max_size:
            max_size, layer_names = size, [name]
        elif size == max_size:
            layer_names.append(name)
    return max_size, layer_names


def _depth_first_layer_names(
    modules: list[tuple[str, nn.Module | torch.Tensor]], no_split: set[str]
) -> Iterator[str]:
    stack = list(reversed(modules))
    while stack:
        name, obj = stack.pop()
        children = list(obj.named_children()) if isinstance(obj, nn.Module) else []
        if not children or type(obj).__name__ in no_split:
            yield name
        else:
            stack.extend((f"{name}.{child}", module) for child, module in reversed(children))


def get_module_leaves(module_sizes: Mapping[str, Size]) -> list[str]:
    """The names in ``module_sizes`` (except ``""``) that have no child name in it, in order."""
    parents = {name.rsplit(".", 1)[0] for name in module_sizes if "." in name}
    return [name for name in module_sizes if name and name not in parents]


def calculate_maximum_sizes(model: nn.Module) -> tuple[Size, tuple[Size, list[str]]]:
    """``(total size, (largest layer size, names))``, with the model's ``_no_split_modules``."""
    sizes = compute_module_sizes(model)
    no_split = getattr(model, "_no_split_modules", None) or []
    top_level = (
        list(model.named_parameters(recurse=False))
        + list(model.named_children())
        + list(model.named_buffers(recurse=False))
    )
    return sizes[""], get_max_layer_size(top_level, sizes, no_split)


def class_names(classes: str | Iterable[str] | None) -> list[str]:
    """``no_split_module_classes`` as a list: one name, several, or none."""
    if classes is None:
        return []
    if isinstance(classes, str):
        return [classes]
    return list(classes)
