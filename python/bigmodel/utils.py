"""accelerate's ``accelerate.utils`` / ``accelerate.utils.modeling`` / ``accelerate.utils.offload``
names, at one import location: ``from bigmodel.utils import compute_module_sizes``.

Only re-exports: every name is defined in the package or module it is imported from.
"""

from bigmodel.hooks import align_module_device, has_offloaded_params
from bigmodel.loading import (
    get_state_dict_from_offload,
    get_state_dict_offloaded_model,
    load_checkpoint_in_model,
    load_state_dict,
)
from bigmodel.offload import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    extract_submodules_state_dict,
    load_offloaded_weight,
    load_offloaded_weights,
    offload_state_dict,
    offload_weight,
    save_offload_index,
)
from bigmodel.operations import find_device, send_to_device
from bigmodel.planning.budgets import get_balanced_memory, get_max_memory
from bigmodel.planning.checks import check_device_map, clean_device_map
from bigmodel.planning.fallback import fallback_allocate
from bigmodel.planning.module_sizes import (
    calculate_maximum_sizes,
    compute_module_sizes,
    compute_module_total_buffer_size,
    dtype_byte_size,
    get_max_layer_size,
    get_module_leaves,
)
from bigmodel.planning.planner import infer_auto_device_map
from bigmodel.planning.tied_groups import get_module_size_with_ties
from bigmodel.sizes import convert_file_size_to_int
from bigmodel.tensors import (
    check_device_same,
    get_non_persistent_buffers,
    id_tensor_storage,
    named_module_tensors,
    set_module_tensor_to_device,
)
from bigmodel.tied import (
    check_tied_parameters_in_config,
    check_tied_parameters_on_same_device,
    find_tied_parameters,
    retie_parameters,
)

__all__ = [
    "OffloadedWeightsLoader",
    "PrefixedDataset",
    "align_module_device",
    "calculate_maximum_sizes",
    "check_device_map",
    "check_device_same",
    "check_tied_parameters_in_config",
    "check_tied_parameters_on_same_device",
    "clean_device_map",
    "compute_module_sizes",
    "compute_module_total_buffer_size",
    "convert_file_size_to_int",
    "dtype_byte_size",
    "extract_submodules_state_dict",
    "fallback_allocate",
    "find_device",
    "find_tied_parameters",
    "get_balanced_memory",
    "get_max_layer_size",
    "get_max_memory",
    "get_module_leaves",
    "get_module_size_with_ties",
    "get_non_persistent_buffers",
    "get_state_dict_from_offload",
    "get_state_dict_offloaded_model",
    "has_offloaded_params",
    "id_tensor_storage",
    "infer_auto_device_map",
    "load_checkpoint_in_model",
    "load_offloaded_weight",
    "load_offloaded_weights",
    "load_state_dict",
    "named_module_tensors",
    "offload_state_dict",
    "offload_weight",
    "retie_parameters",
    "save_offload_index",
    "send_to_device",
    "set_module_tensor_to_device",
]
