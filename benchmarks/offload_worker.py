"""One measurement of `bench_offload.py`, in a fresh process: load the demo checkpoint with
bigmodel or accelerate in one scenario, time it, and print the figures as JSON.

    python benchmarks/offload_worker.py --lib bigmodel --scenario disk --checkpoint DIR \
        --workdir DIR [--cold]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaForCausalLM

from bigmodel.utils import compute_module_sizes

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    evict_from_page_cache,
    reset_peak_rss,
    sequential_read,
    status_kib,
)

PROMPT_TOKENS = 32
DECODE_STEPS = 8
WARM_FORWARDS = 3


def _meta_model(lib, checkpoint: Path) -> LlamaForCausalLM:
    with lib.init_empty_weights():
        return LlamaForCausalLM(AutoConfig.from_pretrained(checkpoint)).eval()


def _all_layers_on_disk(model: LlamaForCausalLM) -> dict[str, str]:
    """Every decoder layer on disk; embeddings, final norm and head in RAM. (accelerate
    cannot load a map whose only device is "disk": it hands "disk" to safetensors.)"""
    layers = {f"model.layers.{i}": "disk" for i in range(len(model.model.layers))}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


def _prompt(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)


def _timed(func):
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def _forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _warm_forward(model, ids) -> tuple[float, torch.Tensor]:
    """Median time of WARM_FORWARDS forwards in a row (the model ran once before), and the
    last output."""
    times = []
    for _ in range(WARM_FORWARDS):
        seconds, logits = _timed(lambda: _forward(model, ids))
        times.append(seconds)
    return statistics.median(times), logits


def _decode_steps(model, ids, evict=None) -> float:
    """Median time of one single-token step with the KV cache, after a prefill."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(DECODE_STEPS):
            if evict is not None:
                evict()
            started = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def _files(checkpoint: Path, offload: Path) -> list[Path]:
    return [*checkpoint.glob("*.safetensors"), *([offload] if offload.exists() else [])]


def _written_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run_inram(lib, checkpoint: Path, workdir: Path, cold: bool) -> dict:
    model = LlamaForCausalLM(AutoConfig.from_pretrained(checkpoint)).eval()
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    ids = _prompt(model)
    reset_peak_rss()
    before_kib = status_kib("VmRSS")
    _forward(model, ids)
    forward_s, logits = _warm_forward(model, ids)
    decode_step_s = _decode_steps(model, ids)
    torch.save(logits, workdir / "logits.pt")
    return {
        "forward_s": forward_s,
        "decode_step_s": decode_step_s,
        # What running the model adds to RSS with every weight already in RAM (activations,
        # KV cache, and the buffers torch sets up on a first forward): the activations
        # allowance of the RAM-budget goal, whose runs pay the same.
        "activations_mb": (status_kib("VmHWM") - before_kib) * 1024 / 1e6,
    }


def _dispatched(lib, checkpoint, workdir, device_map, max_memory=None):
    offload = workdir / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    model = _meta_model(lib, checkpoint)
    baseline_kib = status_kib("VmRSS")
    setup_s, model = _timed(
        lambda: lib.load_checkpoint_and_dispatch(
            model,
            checkpoint,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload,
            no_split_module_classes=["LlamaDecoderLayer"],
        )
    )
    return model, offload, setup_s, baseline_kib


def run_offloaded(lib, checkpoint: Path, workdir: Path, cold: bool, budget: str | None) -> dict:
    if budget is None:
        device_map, max_memory = _all_layers_on_disk(_meta_model(lib, checkpoint)), None
    else:
        device_map, max_memory = "auto", {"cpu": budget}
    model, offload, setup_s, baseline_kib = _dispatched(
        lib, checkpoint, workdir, device_map, max_memory
    )
    written = _written_bytes(offload)
    sizes = compute_module_sizes(model)
    on_disk = sum(sizes[name] for name, device in model.hf_device_map.items() if device == "disk")
    evict = (lambda: evict_from_page_cache(_files(checkpoint, offload))) if cold else None
    ids = _prompt(model)
    if evict:
        evict()
    first_s, logits = _timed(lambda: _forward(model, ids))
    if evict:
        evict()
        later_s, _ = _timed(lambda: _forward(model, ids))
    else:
        later_s, _ = _warm_forward(model, ids)
    decode_s = _decode_steps(model, ids, evict)
    torch.save(logits, workdir / "logits.pt")
    return {
        "setup_s": setup_s,
        "written_bytes": written,
        "offloaded_bytes": on_disk,
        "forward_s": later_s,
        "first_forward_s": first_s,
        "decode_step_s": decode_s,
        "peak_rss_mb": (status_kib("VmHWM") - baseline_kib) * 1024 / 1e6,
    }


def run_cpu(lib, checkpoint: Path, workdir: Path, cold: bool) -> dict:
    if cold:
        evict_from_page_cache(checkpoint.glob("*.safetensors"))
    model = _meta_model(lib, checkpoint)
    ids = _prompt(model)

    def first_output():
        loaded = lib.load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})
        return _forward(loaded, ids)

    seconds, logits = _timed(first_output)
    torch.save(logits, workdir / "logits.pt")
    return {"first_output_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", choices=("bigmodel", "accelerate"), required=True)
    parser.add_argument("--scenario", choices=("inram", "disk", "budget", "cpu"), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--budget", default="600MB")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    lib = importlib.import_module(args.lib)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.cold:
        # Warm means the checkpoint is in the page cache, whatever the previous case evicted.
        sequential_read(sorted(args.checkpoint.glob("*.safetensors")))
    runs = {
        "inram": lambda: run_inram(lib, args.checkpoint, args.workdir, args.cold),
        "disk": lambda: run_offloaded(lib, args.checkpoint, args.workdir, args.cold, None),
        "budget": lambda: run_offloaded(lib, args.checkpoint, args.workdir, args.cold, args.budget),
        "cpu": lambda: run_cpu(lib, args.checkpoint, args.workdir, args.cold),
    }
    print(json.dumps(runs[args.scenario]()))


if __name__ == "__main__":
    main()
