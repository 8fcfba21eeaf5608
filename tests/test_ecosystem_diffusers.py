"""diffusers on bigmodel through `bigmodel.patch_accelerate`: a tiny DiT pipeline (transformer
and VAE built from configs) with ``enable_model_cpu_offload`` and
``enable_sequential_cpu_offload``, compared with the pipeline in RAM and with accelerate.

accelerate's sequential offload with ``device="cpu"`` crashes in ``AlignDevicesHook``
(``TypeError`` rebuilding a parameter), so that case is compared with the pipeline in RAM only.
"""

from __future__ import annotations

import pytest
import torch
from _ecosystem import engine, offline, quiet  # noqa: F401
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import bigmodel.hooks


def _pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        norm_num_groups=8,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    pipeline = DiTPipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler()
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _images(pipeline: DiTPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        class_labels=[1, 3], num_inference_steps=3, generator=generator, output_type="pt"
    ).images


@pytest.fixture(scope="module")
def in_ram() -> torch.Tensor:
    return _images(_pipeline())


def test_model_cpu_offload(in_ram):
    images = {}
    for name in ("accelerate", "bigmodel"):
        pipeline = _pipeline()
        with engine(name):
            pipeline.enable_model_cpu_offload(device="cpu")
            if name == "bigmodel":
                assert isinstance(pipeline.transformer._hf_hook, bigmodel.hooks.CpuOffload)
            images[name] = _images(pipeline)
    assert torch.equal(images["bigmodel"], in_ram)
    assert torch.equal(images["bigmodel"], images["accelerate"])


def test_sequential_cpu_offload(in_ram):
    pipeline = _pipeline()
    with engine("bigmodel"):
        pipeline.enable_sequential_cpu_offload(device="cpu")
        hook = pipeline.transformer.proj_out_2._hf_hook
        assert isinstance(hook, bigmodel.hooks.AlignDevicesHook) and hook.offload
        assert torch.equal(_images(pipeline), in_ram)
