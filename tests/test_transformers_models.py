"""Real transformers architectures (tiny configs) loaded with layers on disk.

Each model is built with random weights, saved with ``save_pretrained``, rebuilt empty from its
config and loaded with ``load_checkpoint_and_dispatch`` with part of its blocks on "disk".
Greedy ``generate`` must give the same tokens as the model in RAM, logits must be bit-identical,
and no ``_no_split_modules`` block may be split across devices.
"""

from __future__ import annotations

import warnings

import accelerate
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from bigmodel import init_empty_weights, load_checkpoint_and_dispatch, load_checkpoint_in_model
from bigmodel.utils import compute_module_sizes

TINY = {
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
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
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ),
    "bert": lambda: BertModel(
        BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ),
    "t5": lambda: T5ForConditionalGeneration(
        T5Config(
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
    ),
}
PROMPT = torch.tensor([[5, 17, 42, 8, 23]])


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY[kind]().eval()


def _empty_like(model):
    with init_empty_weights():
        empty = type(model)(model.config)
    empty.tie_weights()  # transformers 5 does not tie meta-initialised weights by itself
    return empty.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (model in RAM, its save_pretrained folder); GPT-2 is saved in small shards."""
    models = {}
    for kind in TINY:
        model = _build(kind)
        folder = tmp_path_factory.mktemp(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder, max_shard_size="40KB" if kind == "gpt2" else "1GB")
        models[kind] = (model, folder)
    return models


def _half_the_model(model) -> dict[str, int]:
    """A CPU budget that holds about half of the weights, so the rest goes to disk."""
    return {"cpu": compute_module_sizes(model)[""] // 2}


def _device_of(name: str, device_map: dict):
    while name not in device_map:
        name = name.rpartition(".")[0]
    return device_map[name]


def _assert_blocks_whole(model, device_map: dict) -> None:
    no_split = set(model._no_split_modules)
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in no_split]
    assert blocks
    for block_name, block in blocks:
        devices = {_device_of(f"{block_name}.{t}", device_map) for t, _ in block.named_parameters()}
        assert len(devices) == 1, f"{block_name} split across {devices}"


def _generate(model, **kwargs) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=6, do_sample=False, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_generate_with_blocks_on_disk_equals_in_ram(saved, tmp_path, kind, strategy):
    reference, folder = saved[kind]
    model = load_checkpoint_and_dispatch(
        _empty_like(reference),
        folder,
        device_map=strategy,
        max_memory=_half_the_model(reference),
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in model.hf_device_map.values()
    _assert_blocks_whole(model, model.hf_device_map)
    assert torch.equal(_generate(model), _generate(reference))
    with torch.no_grad():
        if kind == "t5":
            decoder_ids = torch.tensor([[0, 3, 4]])
            ours = model(PROMPT, decoder_input_ids=decoder_ids).logits
            expected = reference(PROMPT, decoder_input_ids=decoder_ids).logits
        else:
            ours, expected = model(PROMPT).logits, reference(PROMPT).logits
    assert torch.equal(ours, expected)


def test_bert_hidden_states_with_explicit_cpu_disk_map(saved, tmp_path):
    reference, folder = saved["bert"]
    device_map = {
        "embeddings": "cpu",
        "encoder.layer.0": "disk",
        "encoder.layer.1": "cpu",
        "encoder.layer.2": "disk",
        "encoder.layer.3": "disk",
        "pooler": "cpu",
    }
    model = load_checkpoint_and_dispatch(
        _empty_like(reference), folder, device_map=device_map, offload_folder=tmp_path / "o"
    )
    assert model.encoder.layer[2].output.dense.weight.device.type == "meta"
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        ours = model(PROMPT, attention_mask=mask)
        expected = reference(PROMPT, attention_mask=mask)
    assert torch.equal(ours.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(ours.pooler_output, expected.pooler_output)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["bigmodel.index.json"]


def test_bin_checkpoint_of_llama(saved, tmp_path):
    reference, _ = saved["llama"]
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    model = load_checkpoint_and_dispatch(
        _empty_like(reference),
        folder,
        device_map="sequential",
        max_memory=_half_the_model(reference),
        offload_folder=tmp_path / "o",
    )
    assert torch.equal(_generate(model), _generate(reference))


def test_gpt2_map_and_logits_match_accelerate(saved, tmp_path):
    reference, folder = saved["gpt2"]
    budget = _half_the_model(reference)
    ours = load_checkpoint_and_dispatch(
        _empty_like(reference),
        folder,
        device_map="sequential",
        max_memory=dict(budget),
        offload_folder=tmp_path / "ours",
    )
    with accelerate.init_empty_weights():
        theirs = GPT2LMHeadModel(reference.config)
    theirs.tie_weights()
    theirs = accelerate.load_checkpoint_and_dispatch(
        theirs.eval(),
        str(folder),
        device_map="sequential",
        max_memory=dict(budget),
        no_split_module_classes=["GPT2Block"],
        offload_folder=str(tmp_path / "theirs"),
    )
    assert ours.hf_device_map == theirs.hf_device_map
    with torch.no_grad():
        assert torch.equal(ours(PROMPT).logits, theirs(PROMPT).logits)


def test_gpt2_tied_embeddings_on_disk_between_resident_blocks(saved, tmp_path):
    reference, folder = saved["gpt2"]
    device_map = {
        "transformer.wte": "disk",
        "lm_head": "disk",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.h.2": "cpu",
        "transformer.h.3": "disk",
        "transformer.ln_f": "cpu",
    }
    model = load_checkpoint_and_dispatch(
        _empty_like(reference), folder, device_map=device_map, offload_folder=tmp_path / "o"
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(_generate(model), _generate(reference))
    # the checkpoint holds the tied matrix once; it is served in place under both names
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["bigmodel.index.json"]


def test_t5_keep_in_fp32_modules_with_bfloat16(saved):
    reference, folder = saved["t5"]
    model = _empty_like(reference)
    load_checkpoint_in_model(
        model, folder, dtype=torch.bfloat16, keep_in_fp32_modules=list(model._keep_in_fp32_modules)
    )
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    expected_wo = reference.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and torch.equal(wo, expected_wo)
    wi = model.encoder.block[0].layer[1].DenseReluDense.wi.weight
    assert wi.dtype == torch.bfloat16
    assert torch.equal(wi, reference.encoder.block[0].layer[1].DenseReluDense.wi.weight.bfloat16())
