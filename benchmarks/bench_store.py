"""Reading every tensor of a ~2 GB store: bigmodel (owned copies, zero-copy views) next to
``safetensors.torch.load_file`` (both of its backends) and a plain sequential read.

The store (blocks of 4-22 MiB fp32/bf16 tensors and a 64 MiB embedding, like a 1B-parameter
model) is written once to ``.cache/bench_store/`` and reused; every case reads its shard files.
Every case touches every byte of every tensor the same way (a uint64 sum of its bytes), views
and lazily mapped tensors included; the sequential read (16 MiB ``readinto`` into one reused
buffer, bytes not touched) is the machine's limit.

bigmodel streams the store through a ``--budget`` (default 256MB) residency budget, prefetching
a few tensors ahead, through a store kept open across passes as its offload hooks keep theirs.
Its rates count only the bytes a pass read from the files (the store's byte counter): the
owned store keeps the 64 MiB embedding cached from pass to pass (see rust/store/src/cache.rs),
and those bytes are touched but not counted. The "first pass" row opens a fresh store for
each pass instead, so its buffers are new memory.

safetensors 0.8's ``load_file`` maps the file (tensors are lazy views of the mapping) unless
``backend="pread"``, which reads into new memory: bigmodel's owned rows compare with the pread
backend, its views with the default one.

"cold" evicts the files from the page cache (posix_fadvise DONTNEED) before each timed pass;
the cases alternate round by round and the median of ``--repeats`` rounds is reported. Peak
RSS is measured in a fresh process: VmHWM (anonymous and file-backed pages) minus VmRSS just
before the read.

    python benchmarks/bench_store.py [--size-gb 2] [--repeats 5] [--budget 256MB]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    evict_from_page_cache,
    machine_description,
    sequential_read,
)

from bigmodel import _core  # noqa: E402
from bigmodel.memory import convert_file_size_to_int  # noqa: E402
from bigmodel.store import TensorStore, write_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench_store"
HIDDEN = 2048
# One block of a Llama-style model with grouped-query attention: (name, dtype, shape).
BLOCK = [
    ("q_proj", torch.float32, (HIDDEN, HIDDEN)),  # 16 MiB
    ("k_proj", torch.float32, (HIDDEN // 4, HIDDEN)),  # 4 MiB
    ("v_proj", torch.float32, (HIDDEN // 4, HIDDEN)),  # 4 MiB
    ("o_proj", torch.float32, (HIDDEN, HIDDEN)),  # 16 MiB
    ("gate_proj", torch.bfloat16, (5632, HIDDEN)),  # 22 MiB
    ("up_proj", torch.bfloat16, (5632, HIDDEN)),  # 22 MiB
    ("down_proj", torch.bfloat16, (HIDDEN, 5632)),  # 22 MiB
]
EMBEDDING = ("embed_tokens", torch.float32, (16384, 1024))  # 64 MiB
PREFETCH_AHEAD = 4  # tensors: keeps both read threads busy while the caller touches one


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * shape[0] * shape[1]


def model_layout(size_bytes: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """Names, dtypes and shapes of a model of about ``size_bytes``: embedding, then blocks."""
    block_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in BLOCK)
    blocks = max(1, round((size_bytes - _nbytes(*EMBEDDING[1:])) / block_bytes))
    layout = {EMBEDDING[0]: EMBEDDING[1:]}
    for block in range(blocks):
        for name, dtype, shape in BLOCK:
            layout[f"layers.{block}.{name}"] = (dtype, shape)
    return layout


class SyntheticWeights(Mapping[str, torch.Tensor]):
    """Random weights made on demand, one tensor at a time (the writer never holds 2 GB)."""

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, int]]]):
        self.layout = layout
        self.seeds = {name: seed for seed, name in enumerate(layout)}

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape = self.layout[name]
        generator = torch.Generator().manual_seed(self.seeds[name])
        return torch.randn(shape, generator=generator).to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


def ensure_store(size_gb: float) -> Path:
    """The benchmark store for ``size_gb``, written on first use and reused afterwards."""
    layout = model_layout(int(size_gb * 1e9))
    path = CACHE / f"store-{size_gb:g}gb"
    if (path / _core.INDEX_FILE).exists():
        with TensorStore.open(path) as store:
            stored = {
                name: (store.info(name)["dtype"], store.info(name)["shape"]) for name in store
            }
        if stored == layout:
            return path
    print(f"writing the benchmark store to {path} (once)", file=sys.stderr)
    write_store(path, SyntheticWeights(layout))
    return path


def shard_files(store_path: Path) -> list[Path]:
    return sorted(store_path.glob("*.safetensors"))


def touch(tensor: torch.Tensor) -> int:
    """Reads every byte of ``tensor``: a wrapping uint64 sum of its bytes (numpy, one thread:
    about 20 GB/s here, where torch's two-thread integer sum runs at a few GB/s)."""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    whole = raw.size // 8 * 8
    words = raw[:whole].view(np.uint64)
    return int(words.sum(dtype=np.uint64)) + int(raw[whole:].sum(dtype=np.uint64))


def stream(store: TensorStore) -> int:
    """Every tensor of ``store`` in file order, prefetching ahead; returns the bytes touched."""
    names = list(store)
    total = 0
    for at, name in enumerate(names):
        store.prefetch(names[at + 1 : at + 1 + PREFETCH_AHEAD])
        tensor = store[name]
        touch(tensor)
        total += tensor.nbytes
    return total


def read_store(path: Path, *, zero_copy: bool, budget: int) -> int:
    """One pass over a freshly opened store."""
    with TensorStore.open(path, max_resident=budget, zero_copy=zero_copy) as store:
        return stream(store)


class OpenStore:
    """A store kept open across passes. A pass counts only the bytes it read from the files:
    a tensor still cached from the previous pass (the embedding, see cache.rs) is touched
    but not counted, so the rate is never flattered by cache hits."""

    def __init__(self, path: Path, *, zero_copy: bool, budget: int):
        self.store = TensorStore.open(path, max_resident=budget, zero_copy=zero_copy)

    def read_pass(self) -> int:
        before = self.store.stats()["bytes_read"]
        stream(self.store)
        return self.store.stats()["bytes_read"] - before


def read_safetensors(files: list[Path], backend: str) -> int:
    """``safetensors.torch.load_file`` of every shard, touching each tensor."""
    total = 0
    for file in files:
        tensors = safetensors.torch.load_file(file, backend=backend)
        for tensor in tensors.values():
            touch(tensor)
            total += tensor.nbytes
        del tensors
    return total


OWNED = "bigmodel owned (zero_copy=False)"
OWNED_FIRST = "bigmodel owned, first pass of a fresh store"
VIEWS = "bigmodel zero-copy views"
ST_PREAD = 'safetensors load_file(backend="pread")'
ST_MMAP = "safetensors load_file (mmap, default)"
SEQUENTIAL = "sequential read (not touched)"
# The safetensors case each row is compared with: the one giving the same kind of memory.
SAFETENSORS_PEER = {OWNED: ST_PREAD, OWNED_FIRST: ST_PREAD, VIEWS: ST_MMAP}


def cases(store_path: Path, budget: int) -> dict[str, Callable[[], int]]:
    """The timed passes; each returns the bytes it read from the files. The kept-open stores
    do one untimed pass first (their buffers exist from then on, as in any pass after a
    model's first forward)."""
    files = shard_files(store_path)
    owned = OpenStore(store_path, zero_copy=False, budget=budget)
    views = OpenStore(store_path, zero_copy=True, budget=budget)
    owned.read_pass()
    views.read_pass()
    return {
        OWNED: owned.read_pass,
        OWNED_FIRST: lambda: read_store(store_path, zero_copy=False, budget=budget),
        VIEWS: views.read_pass,
        ST_PREAD: lambda: read_safetensors(files, "pread"),
        ST_MMAP: lambda: read_safetensors(files, "mmap"),
        SEQUENTIAL: lambda: sequential_read(files),
    }


def measure(
    all_cases: dict[str, Callable[[], int]], files: list[Path], repeats: int
) -> dict[str, dict]:
    """Median GB/s (bytes read from the files / seconds) per case and temperature; the runs
    alternate round-robin, warm and cold."""
    sequential_read(files)  # the first warm runs find the files cached
    runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for round_number in range(repeats):
        for temperature in ("warm", "cold"):
            for name, run in all_cases.items():
                if temperature == "cold":
                    evict_from_page_cache(files)
                started = time.perf_counter()
                read = run()
                runs.setdefault((name, temperature), []).append(
                    (read, time.perf_counter() - started)
                )
        print(f"round {round_number + 1}/{repeats} done", file=sys.stderr)
    results: dict[str, dict] = {}
    for (name, temperature), values in runs.items():
        entry = results.setdefault(name, {})
        entry[f"{temperature}_runs"] = [{"bytes": n, "seconds": t} for n, t in values]
        entry[f"{temperature}_gbps"] = statistics.median(n / t for n, t in values) / 1e9
    return results


_RSS_CHILD = """
import sys
sys.path.insert(0, {benchmarks!r})
import torch
import bench_store
from _common import status_kib
from pathlib import Path
store, mode, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
bench_store.touch(torch.ones(1 << 20))  # imports and first calls before the baseline
baseline = status_kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
if mode.startswith("safetensors"):
    backend = mode.split("-")[1]
    bench_store.read_safetensors(bench_store.shard_files(store), backend)
else:
    bench_store.read_store(store, zero_copy=mode == "views", budget=budget)
print(baseline, status_kib("VmHWM"))
"""
RSS_MODES = {
    "owned": OWNED_FIRST,
    "views": VIEWS,
    "safetensors-pread": ST_PREAD,
    "safetensors-mmap": ST_MMAP,
}


def peak_rss_over_baseline(store_path: Path, mode: str, budget: int) -> int:
    """Bytes by which a fresh process's peak RSS grows while reading the whole store once."""
    script = _RSS_CHILD.format(benchmarks=str(Path(__file__).parent))
    child = subprocess.run(
        [sys.executable, "-c", script, str(store_path), mode, str(budget)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"peak RSS measurement ({mode}) failed:\n{child.stderr[-3000:]}")
    baseline_kib, peak_kib = map(int, child.stdout.split()[-2:])
    return (peak_kib - baseline_kib) * 1024


def _ratio(results: dict, name: str, reference: str | None) -> str:
    if reference is None:
        return "-"
    warm, cold = (
        results[name][f"{t}_gbps"] / results[reference][f"{t}_gbps"] for t in ("warm", "cold")
    )
    return f"{warm:.2f}x / {cold:.2f}x"


def markdown_table(results: dict) -> str:
    """The README table: GB/s per case, ratios against safetensors and the sequential read."""
    lines = [
        "| case | warm GB/s | cold GB/s | vs safetensors, same memory kind (warm / cold) "
        "| vs sequential read (warm / cold) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, numbers in results.items():
        peer = _ratio(results, name, SAFETENSORS_PEER.get(name))
        lines.append(
            f"| {name} | {numbers['warm_gbps']:.2f} | {numbers['cold_gbps']:.2f} "
            f"| {peer} | {_ratio(results, name, SEQUENTIAL)} |"
        )
    return "\n".join(lines)


def check_targets(results: dict, peak_rss: dict[str, int], budget: int) -> dict[str, dict]:
    """The targets of this machine class, each with its measured value and verdict."""
    owned = results[OWNED]
    measured = {
        "owned warm GB/s >= 4.5": (owned["warm_gbps"], 4.5),
        "owned warm / safetensors pread warm >= 1.9": (
            owned["warm_gbps"] / results[ST_PREAD]["warm_gbps"],
            1.9,
        ),
        "owned cold / sequential read cold >= 0.9": (
            owned["cold_gbps"] / results[SEQUENTIAL]["cold_gbps"],
            0.9,
        ),
        "owned peak RSS over baseline / budget <= 1.1": (peak_rss["owned"] / budget, 1.1),
    }
    return {
        target: {"value": value, "met": value <= limit if "<=" in target else value >= limit}
        for target, (value, limit) in measured.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the store")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (median reported)")
    parser.add_argument("--budget", default="256MB", help="bigmodel's max_resident")
    args = parser.parse_args()
    budget = convert_file_size_to_int(args.budget)
    store_path = ensure_store(args.size_gb)
    files = shard_files(store_path)
    load_before = os.getloadavg()[0]
    results = measure(cases(store_path, budget), files, args.repeats)
    peak_rss = {mode: peak_rss_over_baseline(store_path, mode, budget) for mode in RSS_MODES}
    targets = check_targets(results, peak_rss, budget)
    report = {
        "machine": machine_description(),
        "store_bytes": sum(f.stat().st_size for f in files),
        "budget_bytes": budget,
        "repeats": args.repeats,
        # Other processes on the machine compete for its cores: the 1-minute load average
        # around the timed rounds tells how quiet it was (this benchmark adds about 1-2).
        "load_average": [load_before, os.getloadavg()[0]],
        "cases": results,
        "peak_rss_over_baseline_bytes": peak_rss,
        "targets": targets,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "results.json").write_text(json.dumps(report, indent=2))
    print(render(report))


def render(report: dict) -> str:
    """The table, the machine line, peak RSS and the targets, as markdown."""
    size_gb, budget_mb = report["store_bytes"] / 1e9, report["budget_bytes"] / 1e6
    load = report["load_average"]
    rss = ", ".join(
        f"{mode} {value / 1e6:.0f} MB"
        for mode, value in report["peak_rss_over_baseline_bytes"].items()
    )
    verdicts = "\n".join(
        f"- {target}: {outcome['value']:.2f} ({'met' if outcome['met'] else 'MISSED'})"
        for target, outcome in report["targets"].items()
    )
    return (
        f"{markdown_table(report['cases'])}\n\n"
        f"Reading every tensor of a {size_gb:.2f} GB store, median of {report['repeats']} "
        f"alternating rounds; bigmodel with max_resident={budget_mb:.0f} MB. "
        f"Machine: {report['machine']}; 1-minute load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after.\n\n"
        f"Peak RSS over the process baseline while reading: {rss}.\n\n"
        f"{verdicts}"
    )


if __name__ == "__main__":
    main()
