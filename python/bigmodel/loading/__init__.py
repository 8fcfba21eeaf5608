"""Loading checkpoints into (possibly empty) models.

- `files`: finding a checkpoint's files, and reading them whole or tensor by tensor;
- `plan`: where each model tensor comes from, where it goes and in which dtype, checked
  before anything is loaded;
- `apply`: carrying the plan out (the offload store committed, resident tensors loaded);
- `api`: `load_checkpoint_in_model` and `load_checkpoint_and_dispatch`;
- `state_dicts`: the state dicts of dispatched models.

The public names are re-exported here (``from bigmodel.loading import ...``) and by
`bigmodel.utils`.
"""

from bigmodel.loading.api import load_checkpoint_and_dispatch, load_checkpoint_in_model
from bigmodel.loading.files import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    checkpoint_files,
    load_state_dict,
)
from bigmodel.loading.plan import CheckpointMismatchError
from bigmodel.loading.state_dicts import get_state_dict_from_offload, get_state_dict_offloaded_model

__all__ = [
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "CheckpointMismatchError",
    "checkpoint_files",
    "get_state_dict_from_offload",
    "get_state_dict_offloaded_model",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "load_state_dict",
]
