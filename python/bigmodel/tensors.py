"""Tensor helpers: list a module's tensors, move one tensor, identify storages.

`set_module_tensor_to_device` is the primitive every loader and hook uses to put one parameter
or buffer on a device (or back on ``meta``). It follows accelerate 1.15 exactly, with one
difference: the device cache is emptied only when the target is a CUDA device (accelerate
empties it after every move to any device other than the strings ``"cpu"``/``"meta"``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# What a `device` argument may be: an accelerator index, a device string, or a torch.device.
Device = int | str | torch.device

# Maps the data pointer of a (CPU/disk) source tensor to the copies already made of it, per
# target device, so that tied weights are materialised once per device.
TiedParamsMap = dict[int, dict[Device, torch.Tensor]]


def keeps_own_dtype(dtype: torch.dtype) -> bool:
    """True for integer and bool dtypes: loading never casts such tensors to another dtype."""
    return str(dtype).startswith(("torch.uint", "torch.int", "torch.bool"))


def as_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float16``, ``"float16"`` or ``"torch.float16"`` as a torch dtype (any other
    object, such as accelerate's ``CustomDtype``, is returned as it is).

    Raises:
        ValueError: a name that is not a torch dtype.
    """
    if not isinstance(dtype, str):
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (such as 'float16' or 'bfloat16')")
    return resolved


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The name `as_torch_dtype` reads back: ``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def owner_and_leaf(module: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    """The module that directly holds the tensor ``tensor_name`` (a dotted name relative to
    ``module``) and the tensor's attribute name in it: ``"block.linear.weight"`` gives
    ``(module.block.linear, "weight")``. The one place dotted tensor names are resolved.

    Raises:
        AttributeError: a segment of the name does not exist.
        ValueError: a segment names a submodule slot that holds None.
    """
    if "." not in tensor_name:  # a direct tensor: the common case
        return module, tensor_name
    *path, leaf = tensor_name.split(".")
    for segment in path:
        child = getattr(module, segment)
        if child is None:
            raise ValueError(f"{module} has no attribute {segment}.")
        module = child
    return module, leaf


def get_tensor(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The parameter or buffer ``tensor_name`` (dotted, relative to ``module``)."""
    owner, leaf = owner_and_leaf(module, tensor_name)
    return getattr(owner, leaf)


def set_tensor(module: nn.Module, tensor_name: str, tensor: torch.Tensor) -> None:
    """Makes ``tensor_name`` (dotted, relative to ``module``) refer to ``tensor``, as
    ``setattr`` does (a Parameter is registered as one; used to tie names together)."""
    owner, leaf = owner_and_leaf(module, tensor_name)
    setattr(owner, leaf, tensor)


def named_module_tensors(
    module: nn.Module,
    include_buffers: bool = True,
    recurse: bool = False,
    remove_non_persistent: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` for the parameters, then (optionally) the buffers of ``module``.

    Args:
        module: the module to list.
        include_buffers: also yield buffers (after all parameters).
        recurse: include the tensors of every submodule, with dotted names.
        remove_non_persistent: skip buffers registered with ``persistent=False``.

    Tied parameters are yielded once, under their first name (torch's duplicate removal).
    """
    yield from module.named_parameters(recurse=recurse)
    if not include_buffers:
        return
    skipped = get_non_persistent_buffers(module, recurse=recurse) if remove_non_persistent else ()
    for name, buffer in module.named_buffers(recurse=recurse):
        if name not in skipped:
            yield name, buffer


def offloaded_tensors(
    module: nn.Module, offload_buffers: bool, recurse: bool = False, remove_duplicate: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``module`` that an offloading hook serves from its weights map: the one
    statement of that rule. They are its parameters and, with ``offload_buffers``, its
    persistent buffers (a non-persistent buffer is in no state dict, so no store holds it).
    Every other buffer of an offloaded module stays resident on its execution device.

    Parameters come first, then buffers, as `named_module_tensors` lists them; with
    ``recurse`` the names are dotted. ``remove_duplicate=False`` lists a tensor reachable
    under several names (tied) under each of them.
    """
    tensors = list(module.named_parameters(recurse=recurse, remove_duplicate=remove_duplicate))
    if offload_buffers:
        non_persistent = get_non_persistent_buffers(module, recurse=recurse, fqns=True)
        tensors += [
            (name, buffer)
            for name, buffer in module.named_buffers(
                recurse=recurse, remove_duplicate=remove_duplicate
            )
            if name not in non_persistent
        ]
    return tensors


def get_non_persistent_buffers(
    module: nn.Module, recurse: bool = False, fqns: bool = False
) -> set[str]:
    """Returns a new set with the names of the module's non-persistent buffers.

    Args:
        module: the module to inspect (its ``_non_persistent_buffers_set`` is never modified).
        recurse: also collect the non-persistent buffers of every submodule.
        fqns: with ``recurse``, name submodule buffers ``"sub.name"`` instead of ``"name"``.
    """
    names = set(module._non_persistent_buffers_set)
    if recurse:
        for prefix, submodule in module.named_modules():
            if fqns:
                names |= {f"{prefix}.{name}" for name in submodule._non_persistent_buffers_set}
            else:
                names |= submodule._non_persistent_buffers_set
    return names


def id_tensor_storage(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """Identifies the storage behind ``tensor``: ``(device, storage pointer, storage bytes)``.

    Views of one storage get the same identifier. Meta tensors have no storage: their pointer
    is 0 (so all meta tensors look alike) and the size is the tensor's own size.
    """
    try:
        storage = tensor.untyped_storage()
        return tensor.device, storage.data_ptr(), storage.nbytes()
    except (NotImplementedError, RuntimeError):
        # Tensor subclasses without a real storage (wrappers, fakes) behave like meta tensors.
        return tensor.device, 0, tensor.nelement() * tensor.element_size()


def check_device_same(first_device: torch.device, second_device: torch.device) -> bool:
    """True if both devices are the same, counting an accelerator without index as index 0.

    ``torch.device("cuda") == torch.device("cuda:0")`` is False in torch; here it is True.
    """
    if first_device.type != second_device.type:
        return False
    return _with_default_index(first_device) == _with_default_index(second_device)


def _with_default_index(device: torch.device) -> torch.device:
    if device.type != "cpu" and device.index is None:
        return torch.device(device.type, index=0)
    return device


def set_module_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: Device,
    value: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    fp16_statistics: torch.Tensor | None = None,
    tied_params_map: TiedParamsMap | None = None,
    non_blocking: bool = False,
    clear_cache: bool = True,
) -> None:
    """Puts one parameter or buffer of ``module`` on ``device``, optionally with a new value.

    Args:
        module: the module holding the tensor (or one of its ancestors).
        tensor_name: the tensor's dotted name relative to ``module`` (``"block.linear.weight"``).
        device: target device (``int``, ``"cpu"``, ``"meta"``, ``"cuda:1"``, ``torch.device``).
        value: new data. Its shape must match the current tensor. Without ``dtype`` it is cast
            to the current tensor's dtype (as ``load_state_dict`` does); with ``dtype`` it is
            cast to ``dtype`` unless it is an integer/bool tensor.
        dtype: see ``value``. Without ``value`` it only applies when moving to ``meta``.
        fp16_statistics: int8 scale statistics, attached as ``SCB`` to a rebuilt parameter.
        tied_params_map: ``{data_ptr: {device: tensor}}``; if the source tensor already has a
            copy on ``device`` that copy is reused, otherwise the new copy is recorded.
        non_blocking: passed to every ``.to``.
        clear_cache: empty the CUDA cache after the move (only when the target is CUDA).

    Parameters are replaced by a new parameter of the same class with the same
    ``requires_grad``; a parameter that needs no change (same device, no value) is left as is.

    Raises:
        AttributeError: a segment of ``tensor_name`` does not exist.
        ValueError: no such parameter/buffer, a meta tensor moved without ``value``, or a
            ``value`` of the wrong shape.
    """
    owner, leaf = _checked_owner_and_leaf(module, tensor_name)
    old = getattr(owner, leaf)
    if _reuse_tied_copy(owner, leaf, old, value, device, tied_params_map):
        return
    if old.device.type == "meta" and not _is_meta(device) and value is None:
        raise ValueError(f"{leaf} is on the meta device, we need a `value` to put in on {device}.")
    if value is not None:
        value = _value_for(old, leaf, value, dtype, non_blocking)
    with torch.no_grad():
        if value is None:
            moved = old.to(device, non_blocking=non_blocking)
            if dtype is not None and _is_meta(device) and not keeps_own_dtype(old.dtype):
                moved = moved.to(dtype, non_blocking=non_blocking)
        else:
            moved = value.to(device, non_blocking=non_blocking)
        stored = _store(owner, leaf, old, moved, value is not None, device)
        if fp16_statistics is not None and leaf in owner._parameters and stored is not old:
            stored.SCB = fp16_statistics.to(device, non_blocking=non_blocking)
    if clear_cache and _is_cuda(device) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _remember_tied_copy(old, value, device, stored, tied_params_map)


def _checked_owner_and_leaf(module: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    """`owner_and_leaf`, refusing a name that holds no parameter or buffer."""
    owner, leaf = owner_and_leaf(module, tensor_name)
    if leaf not in owner._parameters and leaf not in owner._buffers:
        raise ValueError(f"{owner} does not have a parameter or a buffer named {leaf}.")
    return owner, leaf


def _is_meta(device: Device) -> bool:
    # accelerate compares against "meta" and torch.device("meta") with ==; keep that meaning.
    return device == "meta" or device == torch.device("meta")


def _is_cuda(device: Device) -> bool:
    # A bare int is a CUDA index for torch (`tensor.to(0)` goes to cuda:0).
    return isinstance(device, int) or torch.device(device).type == "cuda"


def _reuse_tied_copy(
    owner: nn.Module,
    leaf: str,
    old: torch.Tensor,
    value: torch.Tensor | None,
    device: Device,
    tied_params_map: TiedParamsMap | None,
) -> bool:
    """Assigns an existing device copy of a tied weight, if one was already made."""
    if tied_params_map is None:
        return False
    for source in (value, old):
        if source is None:
            continue
        copies = tied_params_map.get(source.data_ptr())
        if copies is not None and device in copies:
            owner._parameters[leaf] = copies[device]
            return True
    return False


def _remember_tied_copy(
    old: torch.Tensor,
    value: torch.Tensor | None,
    device: Device,
    stored: torch.Tensor,
    tied_params_map: TiedParamsMap | None,
) -> None:
    """Records the new copy under the source pointer that the map tracks (old tensor first)."""
    if tied_params_map is None:
        return
    for source in (old, value):
        if source is None:
            continue
        copies = tied_params_map.get(source.data_ptr())
        if copies is not None:
            if device not in copies:
                copies[device] = stored
            return


def _value_for(
    old: torch.Tensor,
    leaf: str,
    value: torch.Tensor,
    dtype: torch.dtype | None,
    non_blocking: bool,
) -> torch.Tensor:
    """Checks the new value's shape and casts it to the dtype it will be stored with."""
    if old.shape != value.shape:
        raise ValueError(
            f'Trying to set a tensor of shape {value.shape} in "{leaf}" (which has shape '
            f"{old.shape}), this looks incorrect."
        )
    if dtype is None:
        return value.to(old.dtype, non_blocking=non_blocking)
    if keeps_own_dtype(value.dtype):
        return value
    return value.to(dtype, non_blocking=non_blocking)


def _store(
    owner: nn.Module,
    leaf: str,
    old: torch.Tensor,
    moved: torch.Tensor,
    has_value: bool,
    device: Device,
) -> torch.Tensor:
    """Puts ``moved`` into the module; returns the object now stored there."""
    if leaf in owner._buffers:
        owner._buffers[leaf] = moved
        return moved
    changed = has_value or moved.dtype != old.dtype
    if not changed and check_device_same(torch.device(device), old.device):
        return old  # nothing to do: keep the very same Parameter object
    parameter = type(old)(moved, requires_grad=old.requires_grad)
    hf_initialized = getattr(old, "_is_hf_initialized", None)
    if hf_initialized is not None:
        # transformers marks loaded weights with this flag; a rebuilt parameter keeps it.
        parameter._is_hf_initialized = hf_initialized
    owner._parameters[leaf] = parameter
    return parameter
