"""The hook protocol and the hooks, checked against plain PyTorch and against accelerate."""

import copy
import inspect
from typing import NamedTuple
from unittest import mock

import accelerate.big_modeling as acc_big_modeling
import accelerate.hooks as acc_hooks
import accelerate.utils.operations as acc_operations
import pytest
import torch
from _models import ModelForTest, UsesSubmoduleWeights
from torch import nn
from torch.fx import symbolic_trace

from bigmodel.hooks import (
    AlignDevicesHook,
    CpuOffload,
    LayerwiseCastingHook,
    ModelHook,
    SequentialHook,
    UserCpuOffloadHook,
    add_hook_to_module,
    align_module_device,
    attach_align_device_hook,
    attach_align_device_hook_on_blocks,
    attach_execution_device_hook,
    attach_layerwise_casting_hooks,
    has_offloaded_params,
    iter_offload_hooks,
    remove_hook_from_module,
    remove_hook_from_submodules,
)
from bigmodel.offload import PrefixedDataset
from bigmodel.operations import find_device, send_to_device

META = torch.device("meta")
CPU = torch.device("cpu")


class Block(UsesSubmoduleWeights):
    """A preloadable block (preload_module_classes matches the class name)."""


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.Sequential(Block(4, 4), Block(4, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


class Failing(nn.Module):
    """Raises from its forward while ``fail`` is set."""

    def __init__(self, error=RuntimeError):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.fail = True
        self.error = error

    def forward(self, x):
        out = self.linear(x)
        if self.fail:
            raise self.error("boom")
        return out


class PlusOneInput(ModelHook):
    def pre_forward(self, module, *args, **kwargs):
        return (args[0] + 1,) + args[1:], kwargs


class PlusOneOutput(ModelHook):
    def post_forward(self, module, output):
        return output + 1


class Recorder(ModelHook):
    """Records its events in a shared list."""

    def __init__(self, name, events):
        self.name = name
        self.events = events

    def init_hook(self, module):
        self.events.append(f"init {self.name}")
        return module

    def detach_hook(self, module):
        self.events.append(f"detach {self.name}")
        return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------


def test_add_and_remove_keeps_forward_name_signature_and_wrapped():
    model = ModelForTest()
    original_forward = model.forward
    hook = ModelHook()
    add_hook_to_module(model, hook)
    assert model._hf_hook is hook
    assert model._old_forward == original_forward
    assert model.forward.__name__ == "forward"
    assert list(inspect.signature(model.forward).parameters) == ["x"]
    assert model.forward.__wrapped__ == original_forward
    assert "forward" in model.__dict__  # an instance attribute, as transformers expects

    remove_hook_from_module(model)
    assert not hasattr(model, "_hf_hook")
    assert not hasattr(model, "_old_forward")
    assert "forward" not in model.__dict__


def test_append_chains_hooks_and_reruns_init_of_the_old_one():
    events = []
    model = ModelForTest()
    add_hook_to_module(model, Recorder("B", events))
    add_hook_to_module(model, Recorder("C", events), append=True)
    assert isinstance(model._hf_hook, SequentialHook)
    assert [hook.name for hook in model._hf_hook.hooks] == ["B", "C"]
    assert events == ["init B", "detach B", "init B", "init C"]

    events.clear()
    remove_hook_from_module(model)
    assert events == ["detach B", "detach C"]


def test_replacing_a_hook_does_not_detach_the_old_one():
    events = []
    model = ModelForTest()
    add_hook_to_module(model, Recorder("B", events))
    add_hook_to_module(model, Recorder("C", events))
    assert events == ["init B", "init C"]
    assert model._hf_hook.name == "C"


def test_pre_and_post_forward_rewrite_inputs_and_outputs():
    model = ModelForTest().eval()
    x = torch.randn(2, 3)
    expected_plus_one, expected_plus_two = model(x + 1), model(x + 2)

    add_hook_to_module(model, PlusOneInput())
    assert torch.equal(model(x), expected_plus_one)
    add_hook_to_module(model, PlusOneInput())  # replaces, does not chain
    assert torch.equal(model(x), expected_plus_one)
    add_hook_to_module(model, SequentialHook(PlusOneInput(), PlusOneInput()))
    assert torch.equal(model(x), expected_plus_two)

    add_hook_to_module(model, SequentialHook(PlusOneOutput(), PlusOneOutput()))
    assert torch.equal(model(x), model._old_forward(x) + 1 + 1)


def test_no_grad_hook_runs_the_forward_without_autograd():
    model = ModelForTest()
    hook = PlusOneOutput()
    add_hook_to_module(model, hook)
    assert model(torch.randn(2, 3)).requires_grad
    hook.no_grad = True
    assert not model(torch.randn(2, 3)).requires_grad


def test_deepcopy_of_a_hooked_model_calls_the_copy():
    class Tagged(ModelForTest):
        def __init__(self):
            super().__init__()
            self.tag = 1

        def forward(self, x):
            return super().forward(x), self.tag

    original = Tagged().eval()
    add_hook_to_module(original, PlusOneInput())
    copied = copy.deepcopy(original)
    copied.tag = 2
    x = torch.randn(2, 3)
    assert original(x)[1] == 1
    assert copied(x)[1] == 2
    assert copied.forward is not original.forward
    assert torch.equal(copied(x)[0], original(x)[0])


def test_fx_graph_module_stays_editable_after_add_and_remove():
    model = ModelForTest().eval()
    graph_model = symbolic_trace(model)
    x = torch.randn(2, 3)
    add_hook_to_module(graph_model, ModelHook())
    remove_hook_from_module(graph_model, recurse=True)

    linear2 = next(node for node in graph_model.graph.nodes if node.name == "linear2")
    with graph_model.graph.inserting_after(linear2):
        sigmoid = graph_model.graph.call_function(torch.sigmoid, (linear2,))
    output = next(node for node in graph_model.graph.nodes if node.op == "output")
    output.replace_input_with(linear2, sigmoid)
    graph_model.recompile()
    assert torch.equal(graph_model(x), torch.sigmoid(model(x)))


def test_remove_hook_pops_dispatch_wrappers():
    model = ModelForTest()
    add_hook_to_module(model, ModelHook())
    model.to = lambda *args, **kwargs: None
    model.cuda = lambda *args, **kwargs: None
    remove_hook_from_module(model)
    assert "to" not in model.__dict__ and "cuda" not in model.__dict__


# --------------------------------------------------------------------------------------
# AlignDevicesHook: offload
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_offload_hooks_give_bit_identical_outputs_and_restore_on_removal(offload_buffers):
    model = ModelForTest().eval()
    x = torch.randn(2, 3)
    expected = model(x)
    for child in (model.linear1, model.batchnorm, model.linear2):
        add_hook_to_module(
            child,
            AlignDevicesHook(execution_device="cpu", offload=True, offload_buffers=offload_buffers),
        )
    assert model.linear1.weight.device == META
    assert model.batchnorm.weight.device == META
    assert model.batchnorm.running_mean.device == (META if offload_buffers else CPU)

    assert torch.equal(model(x), expected)
    assert model.linear2.weight.device == META  # dropped again after the forward

    remove_hook_from_submodules(model)
    assert model.linear1.weight.device == CPU
    assert model.batchnorm.running_mean.device == CPU
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("with_weights_map", [False, True])
def test_attach_align_device_hook_offloads_every_module_with_tensors(with_weights_map):
    model = ModelForTest().eval()
    x = torch.randn(2, 3)
    expected = model(x)
    weights_map = model.state_dict() if with_weights_map else None
    attach_align_device_hook(model, execution_device="cpu", offload=True, weights_map=weights_map)
    assert all(p.device == META for p in model.parameters())
    assert model.batchnorm.num_batches_tracked.device == CPU
    assert torch.equal(model(x), expected)
    if with_weights_map:
        assert isinstance(model.linear2._hf_hook.weights_map, PrefixedDataset)
        assert model.linear2._hf_hook.weights_map.prefix == "linear2."
    remove_hook_from_submodules(model)
    assert torch.equal(model(x), expected)


def test_placeholders_keep_their_identity_across_forwards():
    model = ModelForTest().eval()
    attach_align_device_hook(model, execution_device="cpu", offload=True)
    placeholder = model.linear1.weight
    model(torch.randn(2, 3))
    assert model.linear1.weight is placeholder


def test_preload_class_loads_the_whole_block_in_one_hook():
    model = Nested().eval()
    x = torch.randn(2, 3)
    expected = model(x)
    attach_align_device_hook(
        model, execution_device="cpu", offload=True, preload_module_classes=["Block"]
    )
    block = model.blocks[0]
    assert block._hf_hook.place_submodules
    assert not hasattr(block.linear, "_hf_hook")
    assert torch.equal(model(x), expected)


class ScaledBlock(nn.Module):
    """Uses a submodule's non-persistent buffer without calling the submodule."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.linear.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        return (x @ self.linear.weight.t() + self.linear.bias) * self.linear.scale


def test_preloaded_submodules_keep_their_non_persistent_buffers_resident():
    """Documented fix: accelerate fetches such a buffer from the weights map, which holds
    only the state dict, and fails."""
    model = nn.Sequential(ScaledBlock(), ScaledBlock()).eval()
    x = torch.randn(2, 4)
    expected = model(x)
    attach_align_device_hook(
        model,
        execution_device="cpu",
        offload=True,
        offload_buffers=True,
        weights_map=model.state_dict(),
        preload_module_classes=["ScaledBlock"],
    )
    assert model[0]._hf_hook.offloaded_names == ["linear.weight", "linear.bias"]
    assert model[0].linear.weight.device == META and model[0].linear.scale.device == CPU
    assert torch.equal(model(x), expected)


def test_offload_hook_moves_kwargs_but_not_skip_keys():
    class Echo(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x, extra=None):
            return x.device, {key: value.device for key, value in extra.items()}

    module = Echo()
    add_hook_to_module(module, AlignDevicesHook(execution_device="meta", skip_keys="keep"))
    x_device, extra_devices = module(
        torch.ones(1), extra={"keep": torch.ones(1), "move": torch.ones(1)}
    )
    assert x_device == META
    assert extra_devices == {"keep": CPU, "move": META}


def test_hook_repr_matches_accelerate():
    ours = AlignDevicesHook("cpu", offload=True, io_same_device=True, skip_keys=["a"])
    theirs = acc_hooks.AlignDevicesHook("cpu", offload=True, io_same_device=True, skip_keys=["a"])
    assert repr(ours) == repr(theirs)


# --------------------------------------------------------------------------------------
# Failing forwards, training refusal
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failing_forward_drops_the_loaded_weights(error):
    model = Failing(error)
    x = torch.randn(2, 3)
    expected = model.linear(x)
    attach_align_device_hook(model, execution_device="cpu", offload=True)
    placeholder = model.linear.weight
    for _ in range(3):
        with pytest.raises(error):
            model(x)
        assert model.linear.weight is placeholder
        assert model.linear._hf_hook._swap.onloads == []
    model.fail = False
    assert torch.equal(model(x), expected)


def test_failing_pre_forward_restores_the_tensors_already_loaded():
    layer = nn.Linear(3, 3)
    weights_map = {"weight": layer.weight.detach().clone()}  # "bias" is missing
    add_hook_to_module(layer, AlignDevicesHook("cpu", offload=True, weights_map=weights_map))
    with pytest.raises(KeyError, match="bias"):
        layer(torch.randn(1, 3))
    assert layer.weight.device == META
    assert layer._hf_hook._swap.onloads == []


def test_sequential_hook_aborts_earlier_hooks_when_a_later_pre_forward_fails():
    class Broken(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            raise ValueError("broken hook")

    layer = nn.Linear(3, 3)
    offload = AlignDevicesHook("cpu", offload=True)
    add_hook_to_module(layer, SequentialHook(offload, Broken()))
    with pytest.raises(ValueError, match="broken hook"):
        layer(torch.randn(1, 3))
    assert layer.weight.device == META and offload._swap.onloads == []


def test_backward_through_offloaded_weights_names_the_parameter():
    model = ModelForTest()
    attach_align_device_hook(model, execution_device="cpu", offload=True, weights_map=None)
    output = model(torch.randn(2, 3))  # inference without no_grad works
    assert output.shape == (2, 5)
    with pytest.raises(RuntimeError, match=r"'linear2\.(weight|bias)'.*cannot be trained"):
        output.sum().backward()


def test_frozen_offloaded_weights_still_give_input_gradients():
    model = ModelForTest().eval()
    reference = copy.deepcopy(model).requires_grad_(False)
    attach_align_device_hook(model, execution_device="cpu", offload=True)
    model.requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    model(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


class SpyLinear(nn.Linear):
    """Records how many backward hooks its weight carries during the forward."""

    def forward(self, x):
        self.hooks_seen = len(self.weight._backward_hooks or {})
        return super().forward(x)


def test_gradient_guard_only_when_autograd_records():
    layer = SpyLinear(3, 3)
    add_hook_to_module(layer, AlignDevicesHook("cpu", offload=True))
    with torch.no_grad():
        layer(torch.randn(1, 3))
    assert layer.hooks_seen == 0
    layer(torch.randn(1, 3))
    assert layer.hooks_seen == 1
    layer.requires_grad_(False)  # on the placeholders: onloaded copies inherit it
    layer(torch.randn(1, 3))
    assert layer.hooks_seen == 0


# --------------------------------------------------------------------------------------
# Inspection, align_module_device, prefetch seam
# --------------------------------------------------------------------------------------


def test_has_offloaded_params():
    assert not has_offloaded_params(ModelForTest())
    aligned = ModelForTest()
    add_hook_to_module(aligned, AlignDevicesHook("cpu"))
    assert not has_offloaded_params(aligned)
    offloaded = nn.Linear(2, 2)
    attach_align_device_hook(offloaded, "cpu", offload=True)
    assert has_offloaded_params(offloaded)
    # Unlike accelerate: an offload hook inside a SequentialHook counts too.
    chained = nn.Linear(2, 2)
    add_hook_to_module(chained, AlignDevicesHook(io_same_device=True))
    attach_align_device_hook(chained, "cpu", offload=True)
    assert isinstance(chained._hf_hook, SequentialHook)
    assert has_offloaded_params(chained)


def test_align_module_device_materialises_offloaded_weights():
    layer = nn.Linear(3, 3)
    expected = layer.weight.detach().clone()
    attach_align_device_hook(layer, "cpu", offload=True)
    with align_module_device(layer):
        assert torch.equal(layer.weight, expected)
    assert layer.weight.device == META
    with pytest.raises(ValueError), align_module_device(layer, "cpu"):
        raise ValueError("inside")
    assert layer.weight.device == META and layer._hf_hook._swap.onloads == []
    assert layer._hf_hook.execution_device == "cpu"


def test_align_module_device_moves_direct_parameters_of_plain_modules():
    model = ModelForTest()
    with mock.patch("bigmodel.hooks.offloaded.set_module_tensor_to_device") as move:
        with align_module_device(model.linear1, "cuda:3"):
            moves_in = [c.args[1:] for c in move.call_args_list]
        moves_out = [c.args[1:] for c in move.call_args_list[len(moves_in) :]]
    assert moves_in == [("weight", "cuda:3"), ("bias", "cuda:3")]
    assert moves_out == [("weight", CPU), ("bias", CPU)]
    with align_module_device(model.linear1):  # no device, not offloaded: nothing happens
        assert model.linear1.weight.device == CPU


def test_prefetcher_runs_before_weights_are_fetched():
    model = Nested().eval()
    x = torch.randn(2, 3)
    expected = model(x)
    weights_map = model.state_dict()
    attach_align_device_hook(
        model, "cpu", offload=True, weights_map=weights_map, preload_module_classes=["Block"]
    )
    calls, released = [], []

    class Recording:
        def on_pre_forward(self, module, hook):
            assert hook.source_map is weights_map
            devices = {p.device for p in module.parameters()}
            calls.append((hook.source_keys(), devices))

        def on_post_forward(self, module, hook):
            released.append({p.device for p in module.parameters()})

    names = []
    for name, _, hook in iter_offload_hooks(model):
        hook.prefetcher = Recording()
        names.append(name)
    assert names == ["embed", "blocks.0", "blocks.1", "norm", "head"]
    assert torch.equal(model(x), expected)
    assert calls[0] == (["embed.weight", "embed.bias"], {META})
    assert calls[1][0] == ["blocks.0.linear.weight", "blocks.0.linear.bias"]
    assert [devices for _, devices in calls] == [{META}] * 5
    assert [len(keys) for keys, _ in calls] == [2] * 5
    assert released == [{META}] * 5, "post-forward runs once the weights are put back"


def test_source_keys_join_nested_prefixes():
    hook = AlignDevicesHook(weights_map=PrefixedDataset(PrefixedDataset({}, "a."), "b."))
    hook.offloaded_names = ["weight"]
    assert hook.source_keys() == ["a.b.weight"]


# --------------------------------------------------------------------------------------
# Layouts compared with accelerate
# --------------------------------------------------------------------------------------


def _layout(model):
    """module name -> repr of its hook chain."""
    layout = {}
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        hooks = hook.hooks if hasattr(hook, "hooks") else (hook,)
        layout[name] = [f"{type(h).__name__}:{h!r}" for h in hooks]
    return layout


def _same_layout(attach_ours, attach_theirs):
    ours, theirs = Nested(), Nested()
    attach_ours(ours)
    attach_theirs(theirs)
    assert _layout(ours) == _layout(theirs)
    return _layout(ours)


def test_attach_align_device_hook_layout_matches_accelerate():
    kwargs = {"execution_device": "cpu", "offload": True, "preload_module_classes": ["Block"]}
    layout = _same_layout(
        lambda m: attach_align_device_hook(m, **kwargs),
        lambda m: acc_hooks.attach_align_device_hook(m, **kwargs),
    )
    assert "blocks.0" in layout and "blocks.0.linear" not in layout


def test_attach_execution_device_hook_layout_matches_accelerate():
    _same_layout(
        lambda m: attach_execution_device_hook(m, "cpu", preload_module_classes=["Block"]),
        lambda m: acc_hooks.attach_execution_device_hook(
            m, "cpu", preload_module_classes=["Block"]
        ),
    )


@pytest.mark.parametrize(
    ("execution_device", "offload"),
    [
        ("cpu", False),
        ("cpu", True),
        ({"": "cpu", "embed": "cpu", "blocks": "cpu", "norm": "cpu", "head": "cpu"}, False),
        (
            {"": "cpu", "embed": "cpu", "blocks": "cpu", "norm": "cpu", "head": "cpu"},
            {"embed": False, "blocks": True, "norm": False, "head": True},
        ),
    ],
)
def test_attach_align_device_hook_on_blocks_layout_matches_accelerate(execution_device, offload):
    kwargs = {
        "execution_device": execution_device,
        "offload": offload,
        "preload_module_classes": ["Block"],
    }
    _same_layout(
        lambda m: attach_align_device_hook_on_blocks(m, **kwargs),
        lambda m: acc_hooks.attach_align_device_hook_on_blocks(m, **kwargs),
    )


def test_blocks_dispatch_runs_bit_identical():
    model = Nested().eval()
    x = torch.randn(2, 3)
    expected = model(x)
    devices = {"": "cpu", "embed": "cpu", "blocks": "cpu", "norm": "cpu", "head": "cpu"}
    offload = {"embed": False, "blocks": True, "norm": False, "head": True}
    attach_align_device_hook_on_blocks(
        model, devices, offload, weights_map=model.state_dict(), preload_module_classes=["Block"]
    )
    assert model.head.weight.device == META and model.embed.weight.device == CPU
    assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------------------
# CpuOffload and layerwise casting
# --------------------------------------------------------------------------------------


def test_cpu_offload_hook_leaves_inputs_alone_when_already_in_place():
    model = nn.Linear(3, 3)
    hook = CpuOffload(execution_device=CPU)
    add_hook_to_module(model, hook)
    x = torch.randn(1, 3)
    args, kwargs = hook.pre_forward(model, x)
    assert args[0] is x and kwargs == {}


def test_cpu_offload_hook_offloads_the_previous_model_first():
    previous = nn.Linear(3, 3)
    previous_hook = UserCpuOffloadHook(previous, CpuOffload(execution_device=CPU))
    current = nn.Linear(3, 3)
    add_hook_to_module(current, CpuOffload(execution_device=CPU, prev_module_hook=previous_hook))
    with mock.patch.object(UserCpuOffloadHook, "offload") as offload:
        current(torch.randn(1, 3))  # previous model is on CPU: nothing to do
        assert offload.call_count == 0
        previous.to("meta")
        current(torch.randn(1, 3))
        assert offload.call_count == 1


def test_user_cpu_offload_hook_remove_and_offload():
    model = nn.Linear(3, 3)
    hook = CpuOffload(execution_device=CPU)
    add_hook_to_module(model, hook)
    user_hook = UserCpuOffloadHook(model, hook)
    model.to(torch.float64)
    user_hook.offload()  # init_hook: model.to("cpu"), dtype untouched
    assert model.weight.dtype == torch.float64
    user_hook.remove()
    assert not hasattr(model, "_hf_hook")


def test_layerwise_casting_stores_low_and_computes_high_precision():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    reference = copy.deepcopy(model)
    for layer in (reference[0], reference[2]):  # what bf16 storage keeps of the weights
        layer.to(torch.bfloat16).to(torch.float32)
    attach_layerwise_casting_hooks(model, torch.bfloat16, torch.float32)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32  # BatchNorm is never cast
    x = torch.randn(3, 4)
    assert torch.equal(model(x), reference(x))
    assert model[2].weight.dtype == torch.bfloat16


def test_layerwise_casting_failed_forward_returns_to_storage_dtype():
    layer = nn.Linear(4, 4)
    add_hook_to_module(layer, LayerwiseCastingHook(torch.bfloat16, torch.float32, False))
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 5))  # wrong input size
    assert layer.weight.dtype == torch.bfloat16


def _cast_layout(skip_pattern, attach):
    model = Nested()
    attach(model, torch.bfloat16, torch.float32, skip_modules_pattern=skip_pattern)
    return sorted(name for name, m in model.named_modules() if hasattr(m, "_hf_hook"))


def test_layerwise_casting_layout_matches_accelerate_for_pattern_tuples():
    ours = _cast_layout(("head", r"blocks\.1"), attach_layerwise_casting_hooks)
    theirs = _cast_layout(("head", r"blocks\.1"), acc_big_modeling.attach_layerwise_casting_hooks)
    assert ours == theirs == ["blocks.0.linear", "embed"]


def test_layerwise_casting_single_string_is_one_pattern():
    # accelerate iterates a string character by character ("head" would skip every name
    # containing an "e"); here it is one regular expression.
    assert _cast_layout("head", attach_layerwise_casting_hooks) == [
        "blocks.0.linear",
        "blocks.1.linear",
        "embed",
    ]
    assert _cast_layout("head", acc_big_modeling.attach_layerwise_casting_hooks) == []


def test_layerwise_casting_skips_classes():
    model = Nested()
    attach_layerwise_casting_hooks(
        model, torch.bfloat16, torch.float32, skip_modules_classes=(Block,)
    )
    hooked = sorted(name for name, m in model.named_modules() if hasattr(m, "_hf_hook"))
    assert hooked == ["embed", "head"]


# --------------------------------------------------------------------------------------
# send_to_device / find_device (what every hook runs its inputs and outputs through)
# --------------------------------------------------------------------------------------


class Pair(NamedTuple):
    first: torch.Tensor
    second: list


class MovableWithoutNonBlocking:
    def __init__(self):
        self.moved_to = None

    def to(self, device):
        self.moved_to = device
        return self


def _nested_inputs():
    return {
        "pair": Pair(torch.ones(1), [torch.zeros(2), "text", 3]),
        "skip": torch.ones(1),
        "deep": {"skip": torch.ones(1), "keep": (torch.ones(1),)},
    }


def _devices(data):
    if isinstance(data, torch.Tensor):
        return data.device.type
    if isinstance(data, dict):
        return {key: _devices(value) for key, value in data.items()}
    if isinstance(data, tuple | list):
        return type(data).__name__, [_devices(item) for item in data]
    return data


def test_send_to_device_matches_accelerate_on_nested_data():
    ours = send_to_device(_nested_inputs(), "meta", skip_keys="skip")
    theirs = acc_operations.send_to_device(_nested_inputs(), "meta", skip_keys="skip")
    assert _devices(ours) == _devices(theirs)
    assert isinstance(ours["pair"], Pair)
    assert _devices(ours)["skip"] == "cpu" and _devices(ours)["deep"]["skip"] == "cpu"
    assert _devices(ours)["deep"]["keep"] == ("tuple", ["meta"])


def test_send_to_device_retries_to_without_non_blocking():
    movable = MovableWithoutNonBlocking()
    assert send_to_device(movable, "meta", non_blocking=True) is movable
    assert movable.moved_to == "meta"


def test_find_device_returns_the_first_tensor_device_depth_first():
    assert find_device([{"a": "text", "b": (torch.ones(1, device="meta"),)}, torch.ones(1)]) == META
    assert find_device({"x": 1, "y": [None]}) is None
    assert find_device(torch.ones(1)) == CPU
