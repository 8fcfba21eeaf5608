"""cpu_offload, cpu_offload_with_hook, disk_offload and dispatch_model.

Every offload path must give the plain in-RAM model's outputs bit for bit (the same tensors
feed the same kernels), and the hook layout accelerate builds on the same model.
"""

import copy
import gc
import json
import logging
import os

import accelerate
import pytest
import torch
from _models import ModelForTest, UsesSubmoduleWeights
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from bigmodel.dispatch import (
    _pick_main_device,
    cpu_offload,
    cpu_offload_with_hook,
    disk_offload,
    dispatch_model,
)
from bigmodel.empty import init_empty_weights
from bigmodel.hooks import (
    AlignDevicesHook,
    UserCpuOffloadHook,
    iter_offload_hooks,
    remove_hook_from_submodules,
)
from bigmodel.offload import StoreWeightsMap, offload_state_dict
from bigmodel.offload.stores import STORE_INDEX_FILE
from bigmodel.store import TensorStore, write_mount, write_store

META = torch.device("meta")
CPU = torch.device("cpu")


class ModelWithUnusedSubModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = UsesSubmoduleWeights(3, 4)
        self.linear2 = UsesSubmoduleWeights(4, 5)
        self.batchnorm = nn.BatchNorm1d(5)
        self.linear3 = UsesSubmoduleWeights(5, 6)

    def forward(self, x):
        return self.linear3(self.batchnorm(self.linear2(self.linear1(x))))


class RootWithTensors(ModelForTest):
    """The root owns a parameter and a non-persistent buffer directly."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((5,), 1.5))
        self.register_buffer("shift", torch.full((5,), 0.25), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.scale + self.shift


class TiedModel(nn.Module):
    """``head.weight`` is ``embed.weight`` (as a language model ties its output layer)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.middle = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.middle(self.embed(x))))


class Failing(ModelForTest):
    """Raises ``error`` after its first layer ran, while ``error`` is set."""

    error = None

    def forward(self, x):
        hidden = self.linear1(x)
        if self.error is not None:
            raise self.error(f"boom {hidden.shape}")
        return self.linear2(self.batchnorm(hidden))


class WeightSpy(nn.Linear):
    """Records the data pointer of its weight during the forward."""

    def forward(self, x):
        self.seen_pointer = self.weight.data_ptr()
        return super().forward(x)


class LinearWithNonPersistentBuffers(nn.Module):
    def __init__(self, size_in, size_out):
        super().__init__()
        self.register_buffer("weight", torch.randn(size_out, size_in))
        self.register_buffer("bias", torch.randn(size_out), persistent=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class ModelWithNonPersistentBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = LinearWithNonPersistentBuffers(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = LinearWithNonPersistentBuffers(4, 5)

    def forward(self, x):
        return self.linear2(self.batchnorm(self.linear1(x)))


def _layout(model):
    """module name -> type and repr of each hook in its chain."""
    layout = {}
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            hooks = hook.hooks if hasattr(hook, "hooks") else (hook,)
            layout[name] = [f"{type(h).__name__}:{h!r}" for h in hooks]
    return layout


def _placements(model):
    return {name: t.device for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pair(model_class):
    """Two identical models in eval mode, and an input."""
    model = model_class().eval()
    return model, copy.deepcopy(model), torch.randn(2, 3)


# --------------------------------------------------------------------------------------
# cpu_offload
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_buffers", [False, True])
@pytest.mark.parametrize("model_class", [ModelForTest, RootWithTensors])
def test_cpu_offload_is_bit_identical_with_accelerate_layout(model_class, offload_buffers):
    model, twin, x = _pair(model_class)
    expected = model(x)
    cpu_offload(model, execution_device="cpu", offload_buffers=offload_buffers)
    accelerate.cpu_offload(twin, execution_device="cpu", offload_buffers=offload_buffers)
    assert _layout(model) == _layout(twin)
    assert _placements(model) == _placements(twin)
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x), twin(x))


def test_cpu_offload_with_preload_classes():
    model, twin, x = _pair(ModelWithUnusedSubModules)
    model.eval()
    expected = model(x)
    preload = ["UsesSubmoduleWeights"]
    cpu_offload(model, "cpu", offload_buffers=True, preload_module_classes=preload)
    accelerate.cpu_offload(twin, "cpu", offload_buffers=True, preload_module_classes=preload)
    assert _layout(model) == _layout(twin)
    assert torch.equal(model(x), expected)


def test_cpu_offload_with_hook_chains_models():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(2, 3)
    expected = second(first(x))
    first, first_hook = cpu_offload_with_hook(first, execution_device="cpu")
    second, second_hook = cpu_offload_with_hook(second, "cpu", prev_module_hook=first_hook)
    assert isinstance(first_hook, UserCpuOffloadHook) and first_hook.model is first
    assert second._hf_hook.prev_module_hook is first_hook
    assert torch.equal(second(first(x)), expected)
    second_hook.offload()
    second_hook.remove()
    assert not hasattr(second, "_hf_hook")


# --------------------------------------------------------------------------------------
# disk_offload
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_disk_offload_writes_one_store_and_is_bit_identical(tmp_path, offload_buffers):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    disk_offload(model, tmp_path / "ours", execution_device="cpu", offload_buffers=offload_buffers)
    accelerate.disk_offload(twin, str(tmp_path / "theirs"), "cpu", offload_buffers=offload_buffers)
    assert _layout(model) == _layout(twin)
    assert _placements(model) == _placements(twin)
    files = os.listdir(tmp_path / "ours")
    assert STORE_INDEX_FILE in files and not [f for f in files if f.endswith(".dat")]
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x), twin(x))


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_disk_offload_with_preload_classes(tmp_path, offload_buffers):
    model, twin, x = _pair(ModelWithUnusedSubModules)
    expected = model(x)
    kwargs = {
        "offload_buffers": offload_buffers,
        "preload_module_classes": ["UsesSubmoduleWeights"],
    }
    disk_offload(model, tmp_path / "ours", "cpu", **kwargs)
    accelerate.disk_offload(twin, str(tmp_path / "theirs"), "cpu", **kwargs)
    assert _layout(model) == _layout(twin)
    assert model.linear1._hf_hook.place_submodules
    assert torch.equal(model(x), expected)


def test_disk_offload_reuses_a_matching_store_without_rewriting(tmp_path):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    disk_offload(model, tmp_path, "cpu")
    index_mtime = os.stat(tmp_path / STORE_INDEX_FILE).st_mtime_ns
    with init_empty_weights():
        empty = ModelForTest().eval()
    for name, buffer in twin.named_buffers():  # buffers are not offloaded by default
        empty.get_submodule(name.rpartition(".")[0]).register_buffer(
            name.rpartition(".")[2], buffer
        )
    disk_offload(empty, tmp_path)  # meta weights: served by the store, run on CPU
    assert os.stat(tmp_path / STORE_INDEX_FILE).st_mtime_ns == index_mtime
    assert torch.equal(empty(x), expected)


def test_disk_offload_rejects_a_store_of_another_model(tmp_path):
    disk_offload(ModelForTest(), tmp_path, "cpu")

    class Wider(ModelForTest):
        def __init__(self):
            super().__init__()
            self.linear2 = nn.Linear(4, 7)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError) as raised:
        disk_offload(Wider(), tmp_path, "cpu")
    message = str(raised.value)
    assert "'extra.weight', 'extra.bias'" in message
    assert "'linear2.weight' is [5, 4] there but [7, 4] in the model" in message
    assert str(tmp_path) in message


def test_disk_offload_of_a_meta_model_without_store_names_the_tensors(tmp_path):
    with init_empty_weights():
        model = ModelForTest()
    with pytest.raises(ValueError, match="'linear1.weight', 'linear1.bias'.*meta device"):
        disk_offload(model, tmp_path)


def test_disk_offload_mounts_an_accelerate_folder_in_place(tmp_path):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    offload_state_dict(tmp_path, twin.state_dict())
    before = sorted(os.listdir(tmp_path))
    disk_offload(model, tmp_path, "cpu")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert torch.equal(model(x), expected)


def test_disk_offload_writes_a_tied_tensor_once(tmp_path):
    model = TiedModel().eval()
    x = torch.randn(2, 4)
    expected = model(x)
    disk_offload(model, tmp_path, "cpu")
    with TensorStore.open(tmp_path) as store:
        assert sorted(store) == ["embed.weight", "middle.bias", "middle.weight"]
    assert torch.equal(model(x), expected)
    # Both tied names share one placeholder between forwards.
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failing_forwards_leave_nothing_pinned(tmp_path, error):
    model, _, x = _pair(Failing)
    expected = model(x)
    disk_offload(model, tmp_path, "cpu")
    store = model.linear1._hf_hook.source_map.sources["linear1.weight"].store
    model.error = error
    for _ in range(100):
        with pytest.raises(error, match="boom"):
            model(x)
    gc.collect()
    assert store.stats()["pinned_bytes"] == 0
    assert model.linear1.weight.device == META
    model.error = None
    assert torch.equal(model(x), expected)  # the next forward works
    assert store.stats()["pinned_bytes"] == 0


def test_disk_offloaded_weights_are_zero_copy_views_of_the_store(tmp_path):
    model = nn.Sequential(WeightSpy(3, 4))
    disk_offload(model, tmp_path, "cpu", max_resident="1MB")
    model(torch.randn(2, 3))
    store = model[0]._hf_hook.source_map.sources["0.weight"].store
    assert model[0].seen_pointer == store["0.weight"].data_ptr()
    assert store.stats()["budget"] == 1_000_000


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_models_refuse_training_instead_of_training_nothing(tmp_path, offload):
    model = ModelForTest()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if offload == "cpu":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, tmp_path, "cpu")
    loss = model(torch.randn(2, 3)).sum()  # a forward with grad enabled works
    with pytest.raises(
        RuntimeError, match=r"'linear2\.(weight|bias)' \(in Linear\).*cannot be trained"
    ):
        loss.backward()
    optimizer.zero_grad()


# --------------------------------------------------------------------------------------
# dispatch_model
# --------------------------------------------------------------------------------------


def test_dispatch_cpu_and_disk_matches_accelerate(tmp_path, caplog):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    device_map = {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"}
    with caplog.at_level(logging.WARNING, logger="bigmodel.dispatch"):
        dispatch_model(model, device_map, offload_dir=tmp_path / "ours")
    accelerate.dispatch_model(twin, device_map, offload_dir=str(tmp_path / "theirs"))
    assert "offloaded to the cpu and disk" in caplog.text
    assert _layout(model) == _layout(twin)
    assert _placements(model) == _placements(twin)
    assert model.hf_device_map == device_map
    assert not [f for f in os.listdir(tmp_path / "ours") if f.endswith(".dat")]
    assert torch.equal(model(x), expected)
    assert torch.equal(model(x), twin(x))


def test_dispatch_offloads_cpu_blocks_to_a_non_cpu_main_device():
    # torch.device("cpu") is not the string "cpu": it counts as an execution device, so the
    # "cpu" blocks are offloaded to RAM as they would be with a GPU main device.
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    device_map = {"linear1": "cpu", "batchnorm": CPU, "linear2": "cpu"}
    dispatch_model(model, device_map)
    accelerate.dispatch_model(twin, device_map)
    assert _layout(model) == _layout(twin)
    assert model.linear1.weight.device == META and model.batchnorm.weight.device == CPU
    assert torch.equal(model(x), expected)


def test_dispatch_everything_to_disk_even_as_one_entry(tmp_path):
    model, _, x = _pair(ModelForTest)
    expected = model(x)
    dispatch_model(model, {"": "disk"}, offload_dir=tmp_path)  # accelerate crashes here
    assert all(p.device == META for p in model.parameters())
    assert torch.equal(model(x), expected)


def test_dispatch_with_preload_classes_and_buffers(tmp_path):
    model, twin, x = _pair(ModelWithUnusedSubModules)
    expected = model(x)
    device_map = {"linear1": "cpu", "linear2": "disk", "batchnorm": "disk", "linear3": "cpu"}
    kwargs = {"offload_buffers": True, "preload_module_classes": ["UsesSubmoduleWeights"]}
    dispatch_model(model, device_map, offload_dir=tmp_path / "ours", **kwargs)
    accelerate.dispatch_model(twin, device_map, offload_dir=str(tmp_path / "theirs"), **kwargs)
    assert _layout(model) == _layout(twin)
    assert torch.equal(model(x), expected)


def test_dispatch_with_non_persistent_buffers_offloaded(tmp_path):
    model, twin, x = _pair(ModelWithNonPersistentBuffers)
    expected = model(x)
    device_map = {"linear1": CPU, "batchnorm": "cpu", "linear2": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path / "ours", offload_buffers=True)
    accelerate.dispatch_model(
        twin, device_map, offload_dir=str(tmp_path / "theirs"), offload_buffers=True
    )
    assert _layout(model) == _layout(twin)
    assert _placements(model) == _placements(twin)
    assert model.linear2.bias.device == CPU  # non-persistent: no store can hold it
    assert torch.equal(model(x), expected)


def test_dispatch_uses_a_given_state_dict_for_cpu_blocks():
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    state_dict = {k: v.clone() for k, v in twin.state_dict().items() if k.startswith("linear1")}
    dispatch_model(
        model, {"linear1": "cpu", "batchnorm": CPU, "linear2": CPU}, state_dict=state_dict
    )
    weights = model.linear1._hf_hook.source_map
    assert weights["linear1.weight"] is state_dict["linear1.weight"]
    assert torch.equal(model(x), expected)


def test_dispatch_serves_a_checkpoint_mounted_in_place(tmp_path):
    # What load_checkpoint_and_dispatch leaves in the offload folder: a mount store.
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    save_file(twin.state_dict(), tmp_path / "model.safetensors")
    write_mount(tmp_path / "offload", [tmp_path / "model.safetensors"])
    before = sorted(os.listdir(tmp_path / "offload"))
    device_map = {"linear1": "disk", "batchnorm": "cpu", "linear2": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path / "offload")
    assert sorted(os.listdir(tmp_path / "offload")) == before
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    ("devices", "main"),
    [
        ({"disk", 1, 0, "cpu"}, 0),
        ({"cuda:1", "cuda:0", "disk"}, "cuda:0"),
        ({"cpu", "disk"}, "cpu"),
    ],
)
def test_main_device_is_the_first_non_offloaded_device(devices, main):
    assert _pick_main_device(devices) == main


def test_dispatch_without_offload_dir_lists_disk_modules():
    with pytest.raises(ValueError, match="need to be offloaded: linear1, linear2."):
        dispatch_model(ModelForTest(), {"linear1": "disk", "batchnorm": "cpu", "linear2": "disk"})


def test_dispatch_reads_an_accelerate_folder(tmp_path):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    state_dict = twin.state_dict()
    offload_state_dict(tmp_path, {k: v for k, v in state_dict.items() if k.startswith("linear2")})
    dispatch_model(
        model, {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"}, offload_dir=tmp_path
    )
    assert torch.equal(model(x), expected)


def test_dispatch_checks_an_existing_store(tmp_path):
    write_store(tmp_path, {"linear2.weight": torch.zeros(3, 4), "linear2.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"'linear2\.weight' is \[3, 4\] there but \[5, 4\]"):
        dispatch_model(
            ModelForTest(),
            {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"},
            offload_dir=tmp_path,
        )


def test_dispatch_with_a_safetensors_offload_index(tmp_path):
    # What transformers passes: entries pointing into checkpoint files, with a dtype.
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    save_file({"w": twin.linear2.weight.detach()}, tmp_path / "a.safetensors")
    save_file({"w": twin.linear2.bias.detach()}, tmp_path / "b.safetensors")  # same key name
    index = {
        "linear2.weight": {
            "safetensors_file": str(tmp_path / "a.safetensors"),
            "weight_name": "w",
            "dtype": "float32",
        },
        "linear2.bias": {"safetensors_file": str(tmp_path / "b.safetensors"), "weight_name": "w"},
    }
    device_map = {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path, offload_index=index)
    assert torch.equal(model(x), expected)


def test_dispatch_with_a_dat_offload_index(tmp_path):
    model, twin, x = _pair(ModelForTest)
    expected = model(x)
    offload_state_dict(
        tmp_path, {"linear2.weight": twin.linear2.weight, "linear2.bias": twin.linear2.bias}
    )
    index = json.loads((tmp_path / "index.json").read_text())
    device_map = {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path, offload_index=index)
    assert torch.equal(model(x), expected)

    del index["linear2.bias"]
    with pytest.raises(ValueError, match=r"the offload_index .* lacks 1 tensor.*'linear2\.bias'"):
        dispatch_model(ModelForTest(), device_map, offload_dir=tmp_path, offload_index=index)


def test_dispatch_single_device_moves_the_model_without_hooks():
    model = ModelForTest()
    dispatch_model(model, {"": "cpu"})
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert model.hf_device_map == {"": "cpu"}
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    assert isinstance(model._hf_hook, AlignDevicesHook) and model._hf_hook.io_same_device


def test_dispatched_model_guards_moves(tmp_path, caplog):
    model = ModelForTest()
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bigmodel.dispatch"):
        model.to(torch.float64)  # dtype only: no warning
        assert caplog.text == ""
        model.to("cpu")
        assert "You shouldn't move a model" in caplog.text
    assert model.linear1.weight.dtype == torch.float64

    offloaded = ModelForTest()
    dispatch_model(
        offloaded, {"linear1": "disk", "batchnorm": "cpu", "linear2": "cpu"}, offload_dir=tmp_path
    )
    for move in (lambda: offloaded.to("cpu"), lambda: offloaded.to(torch.float64)):
        with pytest.raises(RuntimeError, match="offloaded to cpu or disk"):
            move()
    remove_hook_from_submodules(offloaded)
    assert "to" not in offloaded.__dict__


def test_deepcopy_of_a_dispatched_model_is_independent(tmp_path):
    model = ModelForTest()
    dispatch_model(model, {"": "cpu"}, force_hooks=True)
    copied = copy.deepcopy(model)
    copied.to(torch.float64)  # the copy's guarded .to moves the copy only
    assert copied.linear1.weight.dtype == torch.float64
    assert model.linear1.weight.dtype == torch.float32

    offloaded, _, x = _pair(ModelForTest)
    expected = offloaded(x)
    device_map = {"linear1": "disk", "batchnorm": "cpu", "linear2": CPU}
    dispatch_model(offloaded, device_map, offload_dir=tmp_path)
    copied = copy.deepcopy(offloaded)
    assert copied.linear2.forward is not offloaded.linear2.forward
    assert torch.equal(copied(x), expected)
    assert torch.equal(offloaded(x), expected)


def test_tie_between_resident_and_offloaded_module_survives_forward(tmp_path):
    model = TiedModel().eval()
    x = torch.randn(2, 4)
    expected = model(x)
    dispatch_model(model, {"embed": "cpu", "middle": "cpu", "head": "disk"}, offload_dir=tmp_path)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model(x), expected)
    assert model.head.weight is model.embed.weight  # accelerate breaks the tie here


def test_tie_between_two_offloaded_modules_is_one_placeholder(tmp_path):
    model = TiedModel().eval()
    x = torch.randn(2, 4)
    expected = model(x)
    dispatch_model(model, {"embed": "disk", "middle": "cpu", "head": "disk"}, offload_dir=tmp_path)
    with TensorStore.open(tmp_path) as store:
        assert "head.weight" not in store  # written once, under its first name
    assert model.head.weight is model.embed.weight
    assert torch.equal(model(x), expected)
    assert model.head.weight is model.embed.weight


def test_dispatch_hooks_expose_the_store_for_prefetching(tmp_path):
    model = ModelForTest()
    dispatch_model(
        model, {"linear1": "disk", "batchnorm": "cpu", "linear2": "disk"}, offload_dir=tmp_path
    )
    hooks = {name: hook for name, _, hook in iter_offload_hooks(model)}
    assert list(hooks) == ["linear1", "linear2"]
    source = hooks["linear1"].source_map
    assert isinstance(source, StoreWeightsMap) and hasattr(source, "prefetch")
    assert hooks["linear2"].source_keys() == ["linear2.weight", "linear2.bias"]
    source.prefetch(hooks["linear2"].source_keys())  # starts reads, returns at once


def _tiny_gpt2():
    config = GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def test_transformers_model_with_cpu_and_disk_blocks_is_bit_identical(tmp_path):
    model = _tiny_gpt2()
    twin = copy.deepcopy(model)
    input_ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = model(input_ids).logits
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "disk",
        "transformer.h.1": "cpu",
        "transformer.h.2": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    dispatch_model(model, device_map, offload_dir=tmp_path / "ours")
    accelerate.dispatch_model(twin, device_map, offload_dir=str(tmp_path / "theirs"))
    assert _layout(model) == _layout(twin)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)
        assert torch.equal(model(input_ids).logits, twin(input_ids).logits)
    assert model.lm_head.weight is model.transformer.wte.weight
    index = json.loads((tmp_path / "theirs" / "index.json").read_text())
    with TensorStore.open(tmp_path / "ours") as store:
        assert sorted(store) == sorted(index)  # the same tensors as accelerate's folder


def test_transformers_model_fully_on_disk(tmp_path):
    model = _tiny_gpt2()
    input_ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        expected = model(input_ids).logits
    disk_offload(model, tmp_path, "cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)
    assert model.lm_head.weight is model.transformer.wte.weight
