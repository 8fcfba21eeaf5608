"""transformers on bigmodel through `bigmodel.patch_accelerate`: ``from_pretrained`` with
layers on disk, ``device_map="auto"`` with size strings, ``skip_device_map_check``; and a
``disk_offload`` folder written by a tied model reused by an untied twin.

Every output is compared with the model in RAM and with the same call on accelerate.
"""

from __future__ import annotations

import copy

import accelerate
import accelerate.hooks
import pytest
import torch
from _ecosystem import (  # noqa: F401
    ENGINES,
    LLAMA_DISK_MAP,
    PROMPT,
    engine,
    logits,
    offline,
    on_both,
    quiet,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from transformers import AutoModelForCausalLM
from transformers.integrations.accelerate import accelerate_dispatch

import bigmodel
import bigmodel.hooks
from bigmodel.utils import compute_module_sizes

GPT2_DISK_MAP = {
    "transformer.wte": "cpu",
    "transformer.wpe": "cpu",
    "transformer.drop": "cpu",
    "transformer.h.0": "cpu",
    "transformer.h.1": "disk",
    "transformer.h.2": "disk",
    "transformer.h.3": "disk",
    "transformer.ln_f": "cpu",
    "lm_head": "cpu",
}
HOOK_CLASSES = {
    "accelerate": accelerate.hooks.AlignDevicesHook,
    "bigmodel": bigmodel.hooks.AlignDevicesHook,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (model in RAM, its save_pretrained folder)."""
    models = {}
    for kind, build in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model = build()
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        models[kind] = (model, folder)
    return models


def _generate(model) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize(
    ("kind", "device_map", "layer_on_disk"),
    [
        ("llama", LLAMA_DISK_MAP, "model.layers.2.mlp.down_proj"),
        ("gpt2", GPT2_DISK_MAP, "transformer.h.2.mlp.c_fc"),
    ],
)
def test_from_pretrained_with_layers_on_disk(saved, tmp_path, kind, device_map, layer_on_disk):
    reference, folder = saved[kind]
    for name in ENGINES:
        with engine(name):
            model = AutoModelForCausalLM.from_pretrained(
                folder, device_map=device_map, offload_folder=tmp_path / name
            )
        hook = model.get_submodule(layer_on_disk)._hf_hook
        assert isinstance(hook, HOOK_CLASSES[name]) and hook.offload
        assert torch.equal(logits(model), logits(reference)), name
        assert torch.equal(_generate(model), _generate(reference)), name


def test_undo_gives_transformers_back_to_accelerate(saved, tmp_path):
    reference, folder = saved["llama"]
    layer = "model.layers.2.mlp.down_proj"
    with bigmodel.patch_accelerate():
        ours = _dispatched(folder, tmp_path / "ours")
    theirs = _dispatched(folder, tmp_path / "theirs")
    assert isinstance(ours.get_submodule(layer)._hf_hook, bigmodel.hooks.AlignDevicesHook)
    assert isinstance(theirs.get_submodule(layer)._hf_hook, accelerate.hooks.AlignDevicesHook)
    # the model dispatched while patched keeps running on bigmodel
    assert torch.equal(logits(ours), logits(reference))
    assert torch.equal(logits(theirs), logits(reference))


def _dispatched(folder, offload_folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map=LLAMA_DISK_MAP, offload_folder=offload_folder
    )


def test_from_pretrained_auto_map_with_a_size_string_budget(saved, tmp_path):
    reference, folder = saved["llama"]
    budget = f"{compute_module_sizes(reference)[''] // 2000}KB"  # half of the model
    maps, budgets = {}, {}
    for name in ENGINES:
        max_memory = {"cpu": budget}
        with engine(name):
            model = AutoModelForCausalLM.from_pretrained(
                folder, device_map="auto", max_memory=max_memory, offload_folder=tmp_path / name
            )
        maps[name], budgets[name] = model.hf_device_map, max_memory
        assert "disk" in model.hf_device_map.values()
        assert torch.equal(logits(model), logits(reference)), name
    assert maps["bigmodel"] == maps["accelerate"]
    # transformers relies on accelerate converting the caller's dict in place
    assert budgets["bigmodel"] == budgets["accelerate"]


def test_skip_device_map_check_is_honoured(tmp_path):
    # transformers' dispatch for models whose `_no_placement_params` the map leaves out
    reference = tiny_llama()
    device_map = {name: d for name, d in LLAMA_DISK_MAP.items() if name != "model.embed_tokens"}

    def dispatch_without_embeddings_in_the_map(engine_name: str) -> torch.Tensor:
        model = copy.deepcopy(reference)
        model._no_placement_params = ["model.embed_tokens.weight"]
        accelerate_dispatch(model, None, device_map, tmp_path / engine_name, None, False)
        return logits(model)

    results = on_both(dispatch_without_embeddings_in_the_map)
    assert torch.equal(results["bigmodel"], logits(reference))
    assert torch.equal(results["bigmodel"], results["accelerate"])


def _untie(model, reference_state: dict) -> None:
    """Gives every name of a tied group its own copy of the weight."""
    for group in accelerate.utils.find_tied_parameters(model):
        for name in group:
            owner, _, leaf = name.rpartition(".")
            value = reference_state[name].clone()
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value))
    assert not accelerate.utils.find_tied_parameters(model)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_t5], ids=["gpt2", "t5"])
def test_disk_offload_folder_of_a_tied_model_serves_an_untied_twin(tmp_path, build):
    reference = build()
    expected = logits(reference)
    state = {name: t.clone() for name, t in reference.state_dict().items()}
    for offload in (accelerate.disk_offload, bigmodel.disk_offload):
        folder = tmp_path / offload.__module__
        tied = build()
        offload(tied, folder)  # writes the folder
        twin = build()
        _untie(twin, state)
        offload(twin, folder)  # reuses it
        assert torch.equal(logits(tied), expected), offload.__module__
        assert torch.equal(logits(twin), expected), offload.__module__
