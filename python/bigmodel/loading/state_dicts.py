"""The state dicts of dispatched models, whose modules may be offloaded."""

from __future__ import annotations

import logging

import torch
from torch import nn

from bigmodel.hooks import align_module_device, has_offloaded_params

logger = logging.getLogger("bigmodel.loading")  # the logger of bigmodel.loading's modules


def get_state_dict_offloaded_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a model whose modules may be offloaded, on the CPU.

    Each module's weights are brought to the CPU in turn (through its offload hook), so only
    one module's offloaded weights are materialised at a time besides the result. Unlike
    accelerate, tensors registered directly on the root module are included. Keys come in
    ``model.state_dict()`` order.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        try:
            with align_module_device(module, "cpu"):
                module_state = module.state_dict(prefix=prefix)
        except MemoryError:
            raise MemoryError(
                "Offloaded module must fit in CPU memory to call save_model!"
            ) from None
        for name, tensor in module_state.items():
            if tensor.device.type != "meta" and name not in state_dict:
                state_dict[name] = tensor.to("cpu")
    order = list(model.state_dict())
    not_saved = [name for name in order if name not in state_dict]
    if not_saved:
        logger.warning(
            "The following tensors were not saved because they were still on meta device: "
            f"{not_saved}"
        )
    return {name: state_dict[name] for name in order if name in state_dict}


def get_state_dict_from_offload(
    module: nn.Module,
    module_name: str,
    state_dict: dict[str, str | torch.Tensor],
    device_to_put_offload: int | str | torch.device = "cpu",
) -> dict[str, str | torch.Tensor]:
    """Fills the entries of ``state_dict`` that belong to ``module`` with its tensors.

    ``module_name`` is the name of one of the module's tensors (for instance
    ``"encoder.layer.0.output.dense.weight"``); its parent path is the module's prefix.
    Offloaded weights are brought to ``device_to_put_offload``; a module that is not offloaded
    gives its tensors as they are. Returns ``state_dict``.
    """
    root = module_name[: module_name.rfind(".")]
    device = device_to_put_offload if has_offloaded_params(module) else None
    with align_module_device(module, device):
        for key, tensor in module.state_dict().items():
            if f"{root}.{key}" in state_dict:
                state_dict[f"{root}.{key}"] = tensor
    return state_dict
