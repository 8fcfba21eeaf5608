"""accelerate's ``accelerate.hooks`` names, at one import location: ``bigmodel.hooks``.

Only re-exports; the code is in the modules of this package, one concern each:

- `protocol`: `ModelHook`, `SequentialHook`, attaching and removing hooks, the forward lock;
- `align`: `AlignDevicesHook`, which puts a module's inputs and weights on one device;
- `swap`: how an offloading `AlignDevicesHook` swaps weights in for a forward and back out;
- `attach`: attaching `AlignDevicesHook`s to a whole model or to the blocks of a device map;
- `offloaded`: finding offloading hooks in a model (`has_offloaded_params`,
  `iter_offload_hooks`, `align_module_device`, `share_forward_lock`);
- `cpu_offload`: `CpuOffload` and `UserCpuOffloadHook` (whole-model CPU offload);
- `casting`: `LayerwiseCastingHook` and `attach_layerwise_casting_hooks`.
"""

from bigmodel.hooks.align import AlignDevicesHook, Prefetcher
from bigmodel.hooks.attach import (
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
    attach_execution_device_hook,
)
from bigmodel.hooks.casting import (
    SUPPORTED_PYTORCH_LAYERS_FOR_UPCASTING,
    LayerwiseCastingHook,
    attach_layerwise_casting_hooks,
)
from bigmodel.hooks.cpu_offload import CpuOffload, UserCpuOffloadHook
from bigmodel.hooks.offloaded import (
    align_module_device,
    has_offloaded_params,
    iter_offload_hooks,
    share_forward_lock,
)
from bigmodel.hooks.protocol import (
    ForwardLock,
    ModelHook,
    SequentialHook,
    add_hook_to_module,
    remove_hook_from_module,
    remove_hook_from_submodules,
)

__all__ = [
    "SUPPORTED_PYTORCH_LAYERS_FOR_UPCASTING",
    "AlignDevicesHook",
    "CpuOffload",
    "ForwardLock",
    "LayerwiseCastingHook",
    "ModelHook",
    "Prefetcher",
    "SequentialHook",
    "UserCpuOffloadHook",
    "add_hook_to_module",
    "align_module_device",
    "attach_align_device_hook",
    "attach_align_device_hook_on_blocks",
    "attach_execution_device_hook",
    "attach_layerwise_casting_hooks",
    "has_offloaded_params",
    "iter_offload_hooks",
    "remove_hook_from_module",
    "remove_hook_from_submodules",
    "share_forward_lock",
]
