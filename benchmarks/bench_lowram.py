"""Offloaded inference on a machine whose RAM really is smaller than the model.

The demo's 1.87 GB fp32 Llama-style model, with ``max_memory={"cpu": "700MB"}``, loaded
through three paths in turn: bigmodel (`load_checkpoint_and_dispatch(device_map="auto")`),
transformers' own offload path (`from_pretrained(device_map="auto", offload_folder=...)`),
and accelerate. Each run is a fresh process (`lowram_worker.py`), the paths alternate, and
every run's tokens are checked equal to the in-RAM model's.

The memory limit is real: by default each run is a process in a memory cgroup of its own
limited to ``--memlimit`` MiB (1300: `memlimit.py`, as in a container with a memory limit), so
its RSS and the page cache its reads bring in together must fit, and the most the group was
charged is reported. ``--limit "CMD ARGS --"`` puts another limiter in front of each run
instead (e.g. a tool that locks all but 1.3 GB of the machine's RAM and exits 3 when the run
needed more). A run that did not fit is reported as such. Every run starts with the
checkpoint evicted from the page cache.

The floor of a decode step is max(the in-RAM step, bytes that must be streamed per token /
the disk's direct-I/O read rate), where the bytes streamed are the checkpoint's minus the
budget, and the rate is that of ``dd bs=8M iflag=direct`` over the checkpoint files,
measured in the same run.

    python benchmarks/bench_lowram.py [--repeats 3] [--budget 700MB] [--memlimit 1300]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import evict_from_page_cache, machine_description  # noqa: E402

from bigmodel.demo import _ensure_built  # noqa: E402
from bigmodel.utils import convert_file_size_to_int  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
LIBS = ("bigmodel", "transformers", "accelerate")
EXIT_DID_NOT_FIT = 3


def run_worker(lib: str, checkpoint: Path, budget: str, limit: list[str]) -> dict:
    workdir = CACHE / "bench_lowram" / lib
    evict_from_page_cache(checkpoint.glob("*.safetensors"))
    command = [
        *(limit if lib != "inram" else []),
        sys.executable,
        str(Path(__file__).parent / "lowram_worker.py"),
        *("--lib", lib, "--checkpoint", str(checkpoint)),
        *("--workdir", str(workdir), "--budget", budget),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == EXIT_DID_NOT_FIT and limit:
        return {"fit": False}
    if result.returncode != 0:
        return {"fit": False, "error": result.stderr.strip().splitlines()[-1:]}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["fit"] = True
    limiter = re.search(r"^memlimit: (.*)$", result.stderr, re.MULTILINE)
    if limiter:
        figures["charged_mb"] = json.loads(limiter.group(1))["peak_mb"]
    figures["logits"] = workdir / "logits.pt"
    return figures


def direct_read_rate(checkpoint: Path) -> float:
    """Bytes/s of ``dd bs=8M iflag=direct`` over the checkpoint files (no page cache)."""
    total_bytes, total_seconds = 0, 0.0
    for path in sorted(checkpoint.glob("*.safetensors")):
        result = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"],
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", result.stderr)
        total_bytes += int(match.group(1))
        total_seconds += float(match.group(2))
    return total_bytes / total_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", default="700MB")
    parser.add_argument("--memlimit", type=int, default=1300, help="MiB per run (0: none)")
    parser.add_argument("--limit", default="", help='another limiter, e.g. "ramlimit 1300 --"')
    args = parser.parse_args()
    limit = shlex.split(args.limit)
    if not limit and args.memlimit and os.geteuid() == 0:
        limit = [sys.executable, str(Path(__file__).parent / "memlimit.py"), str(args.memlimit)]
        limit.append("--")
    elif not limit and args.memlimit:
        print("not root: memory cgroups unavailable, the runs are not limited", flush=True)
    reference = _ensure_built(CACHE / "demo", 16)
    checkpoint = CACHE / "demo" / "checkpoint"
    del reference

    inram = run_worker("inram", checkpoint, args.budget, [])
    rate = statistics.median(direct_read_rate(checkpoint) for _ in range(3))
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    streamed = checkpoint_bytes - convert_file_size_to_int(args.budget)
    floor = max(inram["decode_step_s"], streamed / rate)

    runs: dict[str, list[dict]] = {lib: [] for lib in LIBS}
    for _ in range(args.repeats):
        for lib in LIBS:
            figures = run_worker(lib, checkpoint, args.budget, limit)
            if figures["fit"]:
                same = torch.equal(torch.load(figures.pop("logits")), torch.load(inram["logits"]))
                figures["exact"] = same and figures["tokens"] == inram["tokens"]
            runs[lib].append(figures)
    report = summarise(runs, inram, floor, rate, streamed)
    print(f"machine: {machine_description()}")
    print(f"limit per run: {' '.join(limit[1:]) or 'none'}; CPU budget {args.budget}")
    print(
        f"floor {floor * 1e3:.0f} ms = max(in-RAM step {inram['decode_step_s'] * 1e3:.0f} ms, "
        f"{streamed / 1e9:.2f} GB / {rate / 1e9:.2f} GB/s direct read)"
    )
    for line in report:
        print(line)


def summarise(runs: dict[str, list[dict]], inram: dict, floor: float, rate, streamed) -> list:
    """One table row per library: medians over the runs that fit, and the spread."""
    lines = [
        "| path | fit | exact | setup s | 32-token forward s | decode step ms (min-max) "
        "| x floor | peak RSS MB | peak RSS + page cache MB | page cache left MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lib, figures in runs.items():
        fitted = [f for f in figures if f["fit"]]
        fit = f"{len(fitted)}/{len(figures)}"
        if not fitted:
            lines.append(f"| {lib} | {fit} | - | - | - | - | - | - | - | - |")
            continue

        def median(key, runs=fitted):
            return statistics.median(f[key] for f in runs)

        steps = [f["decode_step_s"] for f in fitted]
        charged = f"{median('charged_mb'):.0f}" if "charged_mb" in fitted[0] else "-"
        lines.append(
            f"| {lib} | {fit} | {all(f['exact'] for f in fitted)} | {median('setup_s'):.2f} "
            f"| {median('forward_s'):.2f} | {median('decode_step_s') * 1e3:.0f} "
            f"({min(steps) * 1e3:.0f}-{max(steps) * 1e3:.0f}) "
            f"| {median('decode_step_s') / floor:.2f} | {median('peak_rss_mb'):.0f} "
            f"| {charged} | {median('page_cache_mb'):.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
