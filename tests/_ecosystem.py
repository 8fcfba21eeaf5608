"""Shared by the ecosystem tests: tiny transformers models saved locally (nothing is ever
downloaded), and the same call run on accelerate and under `bigmodel.patch_accelerate`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import bigmodel

PROMPT = torch.tensor([[5, 17, 42, 8, 23]])
# Half of the decoder layers of `tiny_llama` on disk, the rest in RAM.
LLAMA_DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
ENGINES = ("accelerate", "bigmodel")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: every model is built from a config and saved in a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def quiet():
    """The clients' config and offload log lines say nothing the tests check."""
    clients = [logging.getLogger(name) for name in ("transformers", "diffusers", "peft")]
    levels = [client.level for client in clients]
    for client in clients:
        client.setLevel(logging.ERROR)
    yield
    for client, level in zip(clients, levels, strict=True):
        client.setLevel(level)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """4 decoder layers, untied embeddings, random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """4 blocks; the output layer is tied to the token embedding."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """2 + 2 blocks; ``shared`` is tied to both embeddings and the output layer."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def logits(model, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """The model's logits for ``prompt`` (T5 decodes the prompt itself)."""
    extra = {"decoder_input_ids": prompt} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(prompt, **extra).logits


def engine(name: str):
    """A context in which accelerate's functions are accelerate's or bigmodel's."""
    return bigmodel.patch_accelerate() if name == "bigmodel" else nullcontext()


def on_both(run: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``run(engine name)`` on accelerate, then under `bigmodel.patch_accelerate`."""
    results = {}
    for name in ENGINES:
        with engine(name):
            results[name] = run(name)
    return results
