"""Where offloaded weights come from.

- `weights_map`: `StoreWeightsMap`, the weights map of bigmodel's offload hooks (tensors in
  RAM first, then per name the store and key that serve it);
- `stores`: the disk store of an offload folder (opened, mounted or written) and the
  sources it gives each name, checked against the model;
- `folders`: accelerate's ``.dat`` offload folders, `OffloadedWeightsLoader` and
  `PrefixedDataset`, with accelerate's behaviour.

This package is also accelerate's ``accelerate.utils.offload`` import location: its names
are re-exported here.
"""

from bigmodel.offload.folders import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    extract_submodules_state_dict,
    load_offloaded_weight,
    load_offloaded_weights,
    offload_state_dict,
    offload_weight,
    save_offload_index,
    unwrap_prefixes,
)
from bigmodel.offload.weights_map import StoreWeightsMap, TensorSource

__all__ = [
    "OffloadedWeightsLoader",
    "PrefixedDataset",
    "StoreWeightsMap",
    "TensorSource",
    "extract_submodules_state_dict",
    "load_offloaded_weight",
    "load_offloaded_weights",
    "offload_state_dict",
    "offload_weight",
    "save_offload_index",
    "unwrap_prefixes",
]
