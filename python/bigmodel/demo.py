"""bigmodel demo (what `make demo` runs): disk-offloaded inference of a model bigger than
its RAM budget.

1. Builds once, in a cache folder (--dir; by default $XDG_CACHE_HOME/bigmodel/demo or
   ~/.cache/bigmodel/demo), a Llama-style checkpoint of about 1.9 GB from a config with a
   fixed seed, and the tokens the plain in-RAM model generates from a fixed prompt (in a
   child process, so this process's memory only shows the offloaded run).
2. Evicts the checkpoint from the page cache, loads it with
   load_checkpoint_and_dispatch(device_map="auto", max_memory={"cpu": budget}), generates
   the same number of tokens, and prints the model size, the budget, the memory really used
   (peak RSS, and the page cache the run's reads left), tokens/s, bytes read, prefetch hit
   rate, time waiting for reads, and whether the tokens equal the in-RAM run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bigmodel import residency
from bigmodel.sizes import format_size, size_option

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


def default_folder() -> Path:
    """``$XDG_CACHE_HOME/bigmodel/demo``, or ``~/.cache/bigmodel/demo``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bigmodel" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``bigmodel demo --help``)."""
    parser.add_argument(
        "--dir",
        type=Path,
        default=default_folder(),
        help="where the demo keeps its checkpoint, about 1.9 GB (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=size_option("--budget"),
        default="600MB",
        help="RAM budget, max_memory for the CPU, e.g. 600MB or 1GiB (default 600MB)",
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")


def run_from_args(args: argparse.Namespace) -> int:
    return 0 if run(args.dir, args.budget, args.tokens) else 1


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


def build(folder: Path, new_tokens: int, config: dict) -> None:
    """Writes the checkpoint and the in-RAM reference tokens (run in a child process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(folder / "checkpoint", max_shard_size="500MB")
    _generate(model, 1)  # warm-up, so the timing below is of generation alone
    started = time.perf_counter()
    tokens = _generate(model, new_tokens)
    seconds = time.perf_counter() - started
    reference = {"tokens": tokens, "seconds": seconds, "new_tokens": new_tokens, "config": config}
    (folder / REFERENCE_FILE).write_text(json.dumps(reference))


def checkpoint_size(config: dict) -> int:
    """Bytes of the float32 checkpoint of a Llama ``config`` (untied embeddings)."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_width = config.get("num_key_value_heads", heads) * hidden // heads
    # q and o projections, k and v, the MLP's three matrices, two norms.
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inner + 2 * hidden
    parameters = 2 * config["vocab_size"] * hidden + config["num_hidden_layers"] * per_layer
    return 4 * (parameters + hidden)


def _ensure_built(folder: Path, new_tokens: int, config: dict = DEMO_CONFIG) -> dict:
    reference_file = folder / REFERENCE_FILE
    if reference_file.exists():
        reference = json.loads(reference_file.read_text())
        if reference["new_tokens"] == new_tokens and reference.get("config") == config:
            return reference
    needed = checkpoint_size(config)
    _check_free_space(folder, needed)
    print(
        f"building the demo checkpoint in {folder}: {format_size(needed)} on disk, written "
        "once and reused (about a minute; delete the folder to get the space back)",
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bigmodel.demo", "--build", str(folder)]
    command += ["--tokens", str(new_tokens), "--config", json.dumps(config)]
    subprocess.run(command, check=True)
    return json.loads(reference_file.read_text())


def _check_free_space(folder: Path, needed: int) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OSError(
            f"the demo needs {format_size(needed)} in {folder}, but only {format_size(free)} "
            "is free there; choose another folder with --dir"
        )


def run(folder: Path, budget: int, new_tokens: int, config: dict = DEMO_CONFIG) -> bool:
    """Loads the checkpoint under ``budget`` bytes and generates; returns whether the tokens
    equal the in-RAM run's."""
    from transformers import AutoConfig, LlamaForCausalLM

    from bigmodel import init_empty_weights, load_checkpoint_and_dispatch
    from bigmodel.prefetch import offload_stats

    folder = Path(folder)
    reference = _ensure_built(folder, new_tokens, config)
    files = [path for path in (folder / "checkpoint", folder / "offload") if path.exists()]
    residency.evict_from_page_cache(files)  # a cold start: every byte is read by this run
    residency.reset_peak_rss()
    baseline = residency.rss_bytes()
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
    read_files = _files_in(folder / "checkpoint", folder / "offload")
    memory = {
        "peak_rss": residency.peak_rss_bytes() - baseline,
        "page_cache": residency.page_cache_bytes(read_files),
        "mapped": residency.mapped_bytes(read_files),
    }
    timing = {"setup": setup_s, "generate": generate_s, "tokens": new_tokens}
    _report(folder, budget, memory, timing, offload_stats(model), reference, tokens)
    return tokens == reference["tokens"]


def _files_in(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*") if path.is_file()]


def _report(folder, budget, memory, timing, stats, reference, tokens) -> None:
    gets = stats["hits"] + stats["misses"]
    checkpoint_bytes = sum(f.stat().st_size for f in (folder / "checkpoint").glob("*.safetensors"))
    tokens_per_s = timing["tokens"] / timing["generate"]
    # Checkpoint pages the process maps (the weights kept in RAM) are in both figures.
    used = memory["peak_rss"] + memory["page_cache"] - memory["mapped"]
    rows = [
        ("model (fp32 checkpoint)", format_size(checkpoint_bytes)),
        ("RAM budget (max_memory cpu)", format_size(budget)),
        ("peak RSS over baseline", f"{format_size(memory['peak_rss'])} (VmHWM)"),
        (
            "page cache left by the run",
            f"{format_size(memory['page_cache'])} of checkpoint and offload files "
            "(evicted before the run)",
        ),
        (
            "RAM used",
            f"{format_size(used)} (the two above, less {format_size(memory['mapped'])} of "
            "checkpoint pages this process maps, which count in both)",
        ),
        ("setup (load_checkpoint_and_dispatch)", f"{timing['setup']:.2f} s"),
        (
            "generation",
            f"{timing['tokens']} tokens in {timing['generate']:.2f} s = {tokens_per_s:.2f} tok/s",
        ),
        ("in-RAM generation (reference)", f"{timing['tokens'] / reference['seconds']:.2f} tok/s"),
        ("bytes read from the store", format_size(stats["bytes_read"])),
        ("prefetch hit rate", f"{stats['prefetch_hits'] / max(gets, 1):.0%} of {gets} reads"),
        ("time waiting for reads", f"{stats['wait_ns'] / 1e9:.2f} s"),
        ("tokens equal the in-RAM run's", "yes" if tokens == reference["tokens"] else "NO"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _build_main() -> int:
    """``python -m bigmodel.demo --build FOLDER --tokens N --config JSON``: the child process
    that writes the checkpoint and the reference tokens."""
    parser = argparse.ArgumentParser(prog="python -m bigmodel.demo")
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--config", type=json.loads, default=DEMO_CONFIG)
    options = parser.parse_args()
    build(options.build, options.tokens, options.config)
    return 0


if __name__ == "__main__":
    sys.exit(_build_main())
