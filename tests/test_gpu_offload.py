"""Offloaded models run on a CUDA GPU: outputs equal to the model run entirely on the GPU,
device memory bounded by the copy window, no empty_cache per tensor. Every test here needs
a CUDA device and is skipped without one (benchmarks/gpu_check.sh runs them on one)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MIB = 2**20
LAYERS = 6


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _layer_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def _device_map(placements: list[str]) -> dict:
    """The decoder layers placed as given ("cpu", "disk" or 0), everything else on GPU 0."""
    device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    device_map |= {f"model.layers.{i}": place for i, place in enumerate(placements)}
    return device_map


@pytest.fixture(scope="module")
def reference():
    """(model on GPU 0, input ids, its logits, its greedy continuation)."""
    model = _llama().to(0)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1)).to(0)
    with torch.inference_mode():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    return model, ids, logits, generated


def _equal_outputs(model, reference) -> None:
    _, ids, logits, generated = reference
    with torch.inference_mode():
        for _ in range(2):  # the second forward takes the copies staged by the first
            assert torch.equal(model(ids).logits, logits)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), generated)


def test_cpu_offload_equals_the_model_on_the_gpu(reference):
    from bigmodel import cpu_offload

    _equal_outputs(cpu_offload(_llama(), execution_device=0), reference)


def test_dispatch_with_cpu_and_disk_layers_equals_the_model_on_the_gpu(reference, tmp_path):
    from bigmodel import dispatch_model

    placements = ["cpu", "disk", 0, "cpu", "disk", "disk"]
    model = dispatch_model(
        _llama(), _device_map(placements), main_device=0, offload_dir=tmp_path / "offload"
    )
    _equal_outputs(model, reference)


def test_load_checkpoint_and_dispatch_auto_equals_the_model_on_the_gpu(reference, tmp_path):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from bigmodel import load_checkpoint_and_dispatch

    source = _llama()
    source.save_pretrained(tmp_path / "checkpoint")
    layer = _layer_bytes(source)
    others = sum(t.numel() * t.element_size() for t in source.state_dict().values())
    others -= LAYERS * layer
    with init_empty_weights():
        model = LlamaForCausalLM(source.config).eval()
    model = load_checkpoint_and_dispatch(
        model,
        tmp_path / "checkpoint",
        device_map="auto",
        max_memory={0: others + 2 * layer, "cpu": 2 * layer},
        no_split_module_classes=["LlamaDecoderLayer"],
        offload_folder=tmp_path / "offload",
    )
    placements = set(model.hf_device_map.values())
    assert {"cpu", "disk"} <= placements, model.hf_device_map
    _equal_outputs(model, reference)


def test_offloaded_weights_on_the_gpu_stay_within_two_layers(reference):
    from bigmodel import dispatch_model
    from bigmodel.transfer import host_to_device

    gpu_model, ids, _, _ = reference
    with torch.inference_mode():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        gpu_model(ids)
        activations = torch.cuda.max_memory_allocated(0) - before

    model = _llama()
    layer = _layer_bytes(model)
    model = dispatch_model(model, _device_map(["cpu"] * LAYERS), main_device=0)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated(0) - before  # embeddings, norm, lm_head
    window = host_to_device(0).window
    with torch.inference_mode():
        model(ids)  # learns the order
        window.peak_modules = 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(0)
        model(ids)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(0) - before
    assert window.peak_modules <= 2
    # Allocator rounding (512-byte blocks) and the copies' own bookkeeping: 1 MiB.
    assert peak <= resident + 2 * layer + activations + MIB, (peak, resident, layer, activations)


def test_no_empty_cache_per_tensor(reference, tmp_path, monkeypatch):
    from bigmodel import load_checkpoint_and_dispatch

    source = _llama()
    source.save_pretrained(tmp_path / "checkpoint")
    emptied: list[int] = []
    empty_cache = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1) or empty_cache())
    model = load_checkpoint_and_dispatch(
        _llama(), tmp_path / "checkpoint", device_map=_device_map(["cpu", 0, 0, "cpu", 0, 0])
    )
    with torch.inference_mode():
        model(reference[1])
    tensors = len(source.state_dict())
    assert len(emptied) <= 1, f"empty_cache called {len(emptied)} times for {tensors} tensors"
