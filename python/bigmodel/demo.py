"""`make demo` / `bigmodel demo`: disk-offloaded inference of a model bigger than its RAM budget.

1. Builds once (cached in ``--dir``) a Llama-style checkpoint of about 1.9 GB from a config
   with a fixed seed, and the tokens the plain in-RAM model generates from a fixed prompt (in
   a child process, so this process's peak memory only shows the offloaded run).
2. Loads it with ``load_checkpoint_and_dispatch(device_map="auto", max_memory={"cpu": budget})``,
   generates the same number of tokens, and prints model size, budget, peak RSS, tokens/s,
   bytes read, prefetch hit rate, wait time, and whether the tokens equal the in-RAM run's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# Llama-style, 24 layers x 1024 hidden: 468M parameters, 1.87 GB in float32.
DEMO_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SEED = 1234
PROMPT_LENGTH = 16
REFERENCE_FILE = "reference.json"


def _prompt(vocab_size: int) -> torch.Tensor:
    return torch.randint(
        0, vocab_size, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(SEED)
    )


def _generate(model, new_tokens: int) -> list[int]:
    with torch.no_grad():
        prompt = _prompt(model.config.vocab_size)
        output = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return output[0, PROMPT_LENGTH:].tolist()


def build(folder: Path, new_tokens: int) -> None:
    """Writes the checkpoint and the in-RAM reference tokens (run in a child process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG)).eval()
    model.save_pretrained(folder / "checkpoint", max_shard_size="500MB")
    _generate(model, 1)  # warm-up, so the timing below is of generation alone
    started = time.perf_counter()
    tokens = _generate(model, new_tokens)
    seconds = time.perf_counter() - started
    reference = {"tokens": tokens, "seconds": seconds, "new_tokens": new_tokens}
    (folder / REFERENCE_FILE).write_text(json.dumps(reference))


def _ensure_built(folder: Path, new_tokens: int) -> dict:
    reference_file = folder / REFERENCE_FILE
    if reference_file.exists():
        reference = json.loads(reference_file.read_text())
        if reference["new_tokens"] == new_tokens:
            return reference
    print(f"building the demo checkpoint in {folder} (once; about a minute) ...", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "bigmodel.demo",
        "--build",
        str(folder),
        "--tokens",
        str(new_tokens),
    ]
    subprocess.run(command, check=True)
    return json.loads(reference_file.read_text())


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in (folder / "checkpoint").glob("*.safetensors"))


def run(folder: Path, budget: str, new_tokens: int) -> bool:
    """Loads the checkpoint under ``budget`` and generates; returns whether tokens match."""
    from transformers import AutoConfig, LlamaForCausalLM

    from bigmodel import init_empty_weights, load_checkpoint_and_dispatch
    from bigmodel.prefetch import offload_stats

    reference = _ensure_built(folder, new_tokens)
    baseline_kib = _memory_kib("VmRSS")
    started = time.perf_counter()
    with init_empty_weights():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(folder / "checkpoint")).eval()
    model = load_checkpoint_and_dispatch(
        model,
        folder / "checkpoint",
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=folder / "offload",
        no_split_module_classes=model._no_split_modules,
    )
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    tokens = _generate(model, new_tokens)
    generate_s = time.perf_counter() - started
    stats = offload_stats(model)
    _report(folder, budget, baseline_kib, setup_s, generate_s, new_tokens, stats, reference, tokens)
    return tokens == reference["tokens"]


def _report(
    folder, budget, baseline_kib, setup_s, generate_s, new_tokens, stats, reference, tokens
):
    from bigmodel.memory import convert_file_size_to_int

    peak_mb = (_memory_kib("VmHWM") - baseline_kib) / 1000 * 1.024
    gets = stats["hits"] + stats["misses"]
    rows = [
        ("model (fp32 checkpoint)", f"{_checkpoint_bytes(folder) / 1e9:.2f} GB"),
        ("RAM budget (max_memory cpu)", f"{convert_file_size_to_int(budget) / 1e6:.0f} MB"),
        ("peak RSS over baseline", f"{peak_mb:.0f} MB (anonymous + file-backed, VmHWM)"),
        ("setup (load_checkpoint_and_dispatch)", f"{setup_s:.2f} s"),
        (
            "generation",
            f"{new_tokens} tokens in {generate_s:.2f} s = {new_tokens / generate_s:.2f} tok/s",
        ),
        ("in-RAM generation (reference)", f"{new_tokens / reference['seconds']:.2f} tok/s"),
        ("bytes read from the store", f"{stats['bytes_read'] / 1e9:.2f} GB"),
        ("prefetch hit rate", f"{stats['prefetch_hits'] / max(gets, 1):.0%} of {gets} reads"),
        ("time waiting for reads", f"{stats['wait_ns'] / 1e9:.2f} s"),
        ("tokens equal the in-RAM run's", "yes" if tokens == reference["tokens"] else "NO"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main(args: argparse.Namespace | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(".cache/demo"), help="checkpoint cache folder"
    )
    parser.add_argument("--budget", default="600MB", help="max_memory for the CPU")
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    options, _ = parser.parse_known_args(getattr(args, "demo_args", None))
    if options.build is not None:
        build(options.build, options.tokens)
        return 0
    return 0 if run(options.dir, options.budget, options.tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
