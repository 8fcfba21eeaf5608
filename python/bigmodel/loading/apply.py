"""Carrying out a load plan: the offload store committed, the resident tensors loaded one at a
time, the offloaded ones left as meta placeholders, the ties restored."""

from __future__ import annotations

import os

import torch
from torch import nn

from bigmodel.loading.files import CheckpointReader
from bigmodel.loading.plan import LoadPlan
from bigmodel.offload.stores import CommittedStore
from bigmodel.store import TensorStore, write_mount, write_store
from bigmodel.tensors import get_tensor, set_module_tensor_to_device, set_tensor
from bigmodel.tied import retie_parameters

# Sub-folder of the offload folder holding the few tensors that have to be written (see
# `commit_offload_store`); the store in the offload folder mounts its shards.
WRITTEN_SUBFOLDER = "written"


def commit_offload_store(
    folder: str, plan: LoadPlan, reader: CheckpointReader, model: nn.Module
) -> CommittedStore:
    """Commits in ``folder`` the store that serves every tensor routed to disk, and says
    under which key it holds each of them.

    Safetensors files holding a disk tensor are mounted (served in place, nothing copied):
    the store holds the tensor under its checkpoint name (a tied name the checkpoint lacks
    reads its partner's). The rest (``.bin`` tensors, model values the checkpoint lacks) is
    written under the model's names, in a sub-folder whose shards the mount also serves when
    both kinds exist.
    """
    mounted_files, to_write, keys = set(), {}, {}
    for name, route in plan.routes.items():
        if route.device != "disk":
            continue
        keys[name] = name
        if route.source is None:
            to_write[name] = get_tensor(model, name).detach()
        elif reader.catalog[route.source].mount_file is not None:
            mounted_files.add(reader.catalog[route.source].mount_file)
            keys[name] = route.source
        else:
            to_write[name] = reader[route.source]
    mounted_files = sorted(mounted_files)
    if mounted_files and to_write:
        written_folder = os.path.join(folder, WRITTEN_SUBFOLDER)
        write_store(written_folder, to_write)
        with TensorStore.open(written_folder) as written:
            shards = [os.path.join(written_folder, f["path"]) for f in written.files()]
        write_mount(folder, [*mounted_files, *shards])
    elif mounted_files:
        write_mount(folder, mounted_files)
    else:
        write_store(folder, to_write)
    return CommittedStore(folder, keys)


def load_resident(model, plan: LoadPlan, reader: CheckpointReader, in_place: bool) -> None:
    """Sets every resident tensor from the checkpoint, one tensor at a time, in file order."""
    position = {name: index for index, name in enumerate(reader.catalog)}
    resident = [
        (name, route)
        for name, route in plan.routes.items()
        if route.device != "disk" and route.source is not None
    ]
    resident.sort(key=lambda item: position[item[1].source])
    reader.start_reading(route.source for _, route in resident)
    for name, route in resident:
        value = reader[route.source]
        current = get_tensor(model, name)
        if in_place and current.device.type != "meta" and route.dtype in (None, current.dtype):
            # Like torch's load_state_dict: the model keeps its Parameter objects.
            with torch.no_grad():
                current.copy_(value)
        else:
            # No clear_cache: emptying the CUDA cache after every tensor (accelerate's
            # default) frees nothing loading could reuse and costs a device sync per tensor.
            set_module_tensor_to_device(
                model, name, route.device, value=value, dtype=route.dtype, clear_cache=False
            )


def place_offload_placeholders(model: nn.Module, plan: LoadPlan) -> None:
    """Offloaded tensors become meta placeholders in the dtype they will compute in."""
    for name, route in plan.routes.items():
        if route.device == "disk":
            set_module_tensor_to_device(model, name, "meta", dtype=route.dtype)


def retie(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Ties again what loading untied, including groups whose members are all offloaded
    (meta placeholders): they share one placeholder, so the tie stays visible to
    ``dispatch_model``, which then serves every name of the group from the one stored copy."""
    retie_parameters(model, tied_params)
    for group in tied_params:
        first = get_tensor(model, group[0])
        if first.device.type == "meta":
            for name in group[1:]:
                set_tensor(model, name, first)
