"""`init_empty_weights` / `init_on_device`, checked against accelerate."""

import threading

import accelerate
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from bigmodel.empty import init_empty_weights, init_on_device

META = torch.device("meta")
CPU = torch.device("cpu")


def _placement(model: nn.Module) -> list[tuple]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t.device, t.dtype, type(t).__name__, t.requires_grad) for name, t in tensors]


def _tiny_bert() -> BertModel:
    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
    )
    return BertModel(config)


def test_parameters_go_to_meta_buffers_stay():
    with init_empty_weights():
        module = nn.BatchNorm1d(4)
        plain = torch.zeros(3)  # factory calls are not redirected
    assert module.weight.device == META
    assert module.running_mean.device == CPU
    assert plain.device == CPU
    assert nn.BatchNorm1d(4).weight.device == CPU  # torch is back to normal


def test_include_buffers_uses_torch_device_context_without_patching():
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer
    with init_empty_weights(include_buffers=True):
        module = nn.BatchNorm1d(4)
        assert nn.Module.register_parameter is register_parameter
        assert nn.Module.register_buffer is register_buffer
    assert module.weight.device == META
    assert module.running_mean.device == META


@pytest.mark.parametrize("include_buffers", [False, True])
def test_same_placement_as_accelerate_on_a_transformers_model(include_buffers):
    with init_empty_weights(include_buffers=include_buffers):
        ours = _tiny_bert()
    with accelerate.init_empty_weights(include_buffers=include_buffers):
        theirs = _tiny_bert()
    assert _placement(ours) == _placement(theirs)
    assert {t.device for t in ours.parameters()} == {META}


def test_huge_model_is_built_without_memory():
    with init_empty_weights():
        model = nn.Sequential(*[nn.Linear(10_000, 10_000) for _ in range(100)])  # 10 G params
    assert all(p.device == META for p in model.parameters())


@pytest.mark.parametrize(
    ("variables", "buffer_device"),
    [
        ({"ACCELERATE_INIT_INCLUDE_BUFFERS": "yes"}, META),
        ({"ACCELERATE_INIT_INCLUDE_BUFFERS": "0"}, CPU),
        ({"BIGMODEL_INIT_INCLUDE_BUFFERS": "true"}, META),
        # bigmodel's variable wins over accelerate's
        ({"BIGMODEL_INIT_INCLUDE_BUFFERS": "off", "ACCELERATE_INIT_INCLUDE_BUFFERS": "1"}, CPU),
    ],
)
def test_environment_gives_the_include_buffers_default(monkeypatch, variables, buffer_device):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with init_empty_weights():
        module = nn.BatchNorm1d(2)
    assert module.running_mean.device == buffer_device
    with init_on_device(META):
        module = nn.BatchNorm1d(2)
    assert module.running_mean.device == buffer_device


def test_invalid_environment_value_is_rejected(monkeypatch):
    monkeypatch.setenv("ACCELERATE_INIT_INCLUDE_BUFFERS", "maybe")
    with pytest.raises(ValueError, match="maybe"), init_empty_weights():
        pass


def test_parameter_class_requires_grad_and_attributes_survive():
    class TaggedParameter(nn.Parameter):
        def __new__(cls, data=None, requires_grad=True, tag=None):
            parameter = super().__new__(cls, data, requires_grad)
            parameter.tag = tag
            return parameter

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tagged = TaggedParameter(torch.ones(2), requires_grad=False, tag="x")
            plain = nn.Parameter(torch.ones(2))
            plain._is_hf_initialized = True
            plain.note = "kept"
            self.plain = plain

    with init_empty_weights():
        holder = Holder()
    assert type(holder.tagged) is TaggedParameter
    assert holder.tagged.device == META
    assert holder.tagged.tag == "x" and not holder.tagged.requires_grad
    assert holder.plain.device == META
    assert holder.plain._is_hf_initialized and holder.plain.note == "kept"


def test_contexts_nest_innermost_device_wins():
    with init_on_device(META):
        with init_on_device(CPU):
            inner = nn.Linear(2, 2)
        after_inner = nn.Linear(2, 2)
    assert inner.weight.device == CPU
    assert after_inner.weight.device == META
    assert nn.Linear(2, 2).weight.device == CPU


def test_patch_is_removed_after_an_exception():
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError), init_empty_weights():
        raise RuntimeError("inside")
    assert nn.Module.register_parameter is original
    assert nn.Linear(2, 2).weight.device == CPU


def test_other_threads_are_not_affected():
    block_open, other_done = threading.Event(), threading.Event()
    devices = {}

    def build_elsewhere():
        block_open.wait()
        devices["other"] = nn.Linear(2, 2).weight.device
        other_done.set()

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    with init_empty_weights():
        block_open.set()
        assert other_done.wait(timeout=30)
        devices["inside"] = nn.Linear(2, 2).weight.device
    thread.join()
    assert devices == {"other": CPU, "inside": META}
