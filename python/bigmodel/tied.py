"""Tied parameters: one Parameter object reachable under several names (tied embeddings...).

Planning keeps tied parameters on one device, loading re-establishes ties that hooks or
checkpoint loading broke. Names and results match accelerate 1.15.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

from torch import nn

from bigmodel.planning.checks import covering_key
from bigmodel.planning.module_sizes import ModelScan
from bigmodel.tensors import get_tensor, set_tensor

logger = logging.getLogger(__name__)


def find_tied_parameters(model: nn.Module, **kwargs: object) -> list[list[str]]:
    """Groups of names that refer to the same Parameter object.

    Each group is sorted and holds the first (canonical) name of the parameter and all its
    other names, e.g. ``[["linear1.weight", "linear2.weight"]]``. Buffers are not considered.
    ``kwargs`` are accepted for compatibility and ignored.

    As in accelerate, groups are listed in the iteration order of a set of names (stable within
    a process, not across runs): compare them sorted.
    """
    return tied_parameter_groups(ModelScan(model))


def tied_parameter_groups(scan: ModelScan) -> list[list[str]]:
    """`find_tied_parameters` for an already scanned model."""
    if not scan.parameter_aliases:
        return []
    first_name_of = {id(p): scan.first_name_of[id(p)] for _, p in scan.parameter_aliases}
    alias_names = [name for name, _ in scan.parameter_aliases]
    if len(first_name_of) > 1:
        # Several groups: list them in accelerate's order, that of a set difference of
        # names (built from the same names in the same order to iterate the same way).
        # (Sets built name by name from lists, like accelerate's: from a dict the set would
        # be presized and iterate in another order.)
        every_name, first_names = scan.every_parameter_name(), list(scan.parameter_bytes)
        alias_names = list(set(every_name) - set(first_names))
    parameter_of = dict(scan.parameter_aliases)
    aliases_of: dict[str, list[str]] = {}
    for alias in alias_names:
        aliases_of.setdefault(first_name_of[id(parameter_of[alias])], []).append(alias)
    return [sorted([first_name, *aliases]) for first_name, aliases in aliases_of.items()]


def retie_parameters(model: nn.Module, tied_params: list[list[str]]) -> None:
    """Makes every name of each group point to one Parameter again.

    The shared object is the first member (in group order) that is not on the meta device;
    a group whose members are all on meta is left alone.
    """
    for group in tied_params:
        source = next(
            (
                parameter
                for parameter in (get_tensor(model, name) for name in group)
                if parameter.device.type != "meta"
            ),
            None,
        )
        if source is None:
            continue
        for name in group:
            set_tensor(model, name, source)


def check_tied_parameters_on_same_device(
    tied_params: list[list[str]], device_map: Mapping[str, object]
) -> None:
    """Logs a warning for each tied group whose members the device map puts on several devices.

    Raises:
        ValueError: the device map gives no device for one of the names.
    """
    for group in tied_params:
        devices = {name: _required_device(name, device_map) for name in group}
        if len(set(devices.values())) > 1:
            logger.warning(
                f"Tied parameters are on different devices: {devices}. "
                "Please modify your custom device map or set `device_map='auto'`. "
            )


def _required_device(name: str, device_map: Mapping[str, object]) -> object:
    key = covering_key(name, device_map)
    if key is None:
        raise ValueError(f"The `device_map` does not contain the module {name}.")
    return device_map[key]


def check_tied_parameters_in_config(model: nn.Module) -> bool:
    """True if a transformers model's config or modules say that some weights should be tied.

    Looks at ``tie_word_embeddings`` (with output embeddings present), ``is_encoder_decoder``
    with ``tie_encoder_decoder``, and submodules with a ``_tie_weights`` method. Always False
    for models that are not transformers ``PreTrainedModel`` subclasses.
    """
    if "PreTrainedModel" not in [cls.__name__ for cls in inspect.getmro(type(model))]:
        return False
    config = getattr(model, "config", None)
    decoder_config = config
    if config is not None and hasattr(config, "get_text_config"):
        decoder_config = config.get_text_config(decoder=True)
    ties_word_embeddings = bool(
        decoder_config is not None
        and getattr(decoder_config, "tie_word_embeddings", False)
        and model.get_output_embeddings()
    )
    ties_encoder_decoder = bool(
        getattr(config, "is_encoder_decoder", False)
        and getattr(config, "tie_encoder_decoder", False)
    )
    has_tying_module = any(hasattr(module, "_tie_weights") for module in model.modules())
    return ties_word_embeddings or ties_encoder_decoder or has_tying_module
