"""One measurement of `bench_lowram.py`, in a fresh process: load the demo checkpoint with a
CPU budget through one library's path, run it, and print the figures as JSON.

    python benchmarks/lowram_worker.py --lib bigmodel --checkpoint DIR --workdir DIR \
        [--budget 700MB]

``--lib``: ``bigmodel`` (`load_checkpoint_and_dispatch(device_map="auto", max_memory=...)`),
``accelerate`` (the same call), ``transformers`` (its own path: `from_pretrained(...,
device_map="auto", max_memory=..., offload_folder=...)`), or ``inram`` (no offload: the
compute floor, run without a memory limit).
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
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from _common import reset_peak_rss, status_kib  # noqa: E402

from bigmodel.residency import page_cache_bytes  # noqa: E402

PROMPT_TOKENS = 32
DECODE_STEPS = 8
FORWARDS = 3  # the first, then the median of the others is reported


def _load(lib: str, checkpoint: Path, offload: Path, budget: str):
    max_memory = {"cpu": budget}
    if lib == "inram":
        return AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if lib == "transformers":
        return AutoModelForCausalLM.from_pretrained(
            checkpoint, device_map="auto", max_memory=max_memory, offload_folder=offload
        ).eval()
    library = importlib.import_module(lib)
    with library.init_empty_weights():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(checkpoint)).eval()
    return library.load_checkpoint_and_dispatch(
        model,
        checkpoint,
        device_map="auto",
        max_memory=max_memory,
        offload_folder=offload,
        no_split_module_classes=["LlamaDecoderLayer"],
    )


def _timed(func):
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def _forwards(model, ids) -> tuple[float, float, torch.Tensor]:
    """The first forward's time, the median of the later ones, and the last logits."""
    times, logits = [], None
    with torch.no_grad():
        for _ in range(FORWARDS):
            seconds, logits = _timed(lambda: model(ids).logits)
            times.append(seconds)
    return times[0], statistics.median(times[1:]), logits


def _decode(model, ids) -> tuple[list[float], list[int]]:
    """Greedy single-token steps with the KV cache after a prefill: each step's time and
    the tokens generated."""
    times, tokens = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(DECODE_STEPS):
            started = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return times, tokens


def run(lib: str, checkpoint: Path, workdir: Path, budget: str) -> dict:
    offload = workdir / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir(parents=True)
    files = [*checkpoint.glob("*.safetensors")]
    reset_peak_rss()
    baseline_kib = status_kib("VmRSS")
    setup_s, model = _timed(lambda: _load(lib, checkpoint, offload, budget))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    first_s, forward_s, logits = _forwards(model, ids)
    steps, tokens = _decode(model, ids)
    torch.save(logits, workdir / "logits.pt")
    return {
        "setup_s": setup_s,
        "first_forward_s": first_s,
        "forward_s": forward_s,
        "decode_step_s": statistics.median(steps),
        "decode_steps_s": steps,
        "tokens": tokens,
        "peak_rss_mb": (status_kib("VmHWM") - baseline_kib) * 1024 / 1e6,
        "page_cache_mb": page_cache_bytes([*files, *offload.rglob("*")]) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--lib", choices=("bigmodel", "accelerate", "transformers", "inram"), required=True
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--budget", default="700MB")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.lib, args.checkpoint, args.workdir, args.budget)))


if __name__ == "__main__":
    main()
