"""Reading every tensor of a ~2 GB store: bigmodel (owned copies, zero-copy views) next to
``safetensors.torch.load_file`` (both of its backends), a plain sequential read and ``dd``
with direct I/O; and the real memory a budgeted store takes (RSS and page cache).

The store (blocks of 4-22 MiB fp32/bf16 tensors and a 64 MiB embedding, like a 1B-parameter
model) is written once to ``.cache/bench_store/`` and reused; every case reads its shard files.
Every case touches every byte of every tensor the same way (a uint64 sum of its bytes), views
and lazily mapped tensors included; the sequential read (16 MiB ``readinto`` into one reused
buffer, bytes not touched) and ``dd if=FILE of=/dev/null bs=8M iflag=direct`` over the same
files are the machine's limits (bigmodel's owned reads are direct reads too).

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

Real memory: a fresh process reads a 1 GiB store twice, tensor by tensor, with
``max_resident=128MB`` (the store's default read mode for a budget: owned direct reads; and
zero-copy views for comparison), and reports its peak RSS growth and the bytes of the store's
files left in the page cache (``mincore``; the files are evicted first).

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
from bigmodel.store import TensorStore, write_store  # noqa: E402
from bigmodel.utils import convert_file_size_to_int  # noqa: E402

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
GIB_STORE_GB = 2**30 / 1e9  # the store of the real-memory measurement: 1 GiB
GIB_STORE_BUDGET = 128 * 10**6
DIRECT_BLOCK = 4096  # bytes: the block of a direct read


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


def _block_aligned(store_path: Path) -> bool:
    """Whether the store's large tensors start on 4096-byte blocks (stores written before
    the writer aligned them are rewritten, so direct reads land in place as they do now)."""
    index = json.loads((store_path / _core.INDEX_FILE).read_text())
    return all(
        e["offset"] % DIRECT_BLOCK == 0 for e in index["tensors"] if e["length"] >= DIRECT_BLOCK
    )


def ensure_store(size_gb: float) -> Path:
    """The benchmark store for ``size_gb``, written on first use and reused afterwards."""
    layout = model_layout(int(size_gb * 1e9))
    path = CACHE / f"store-{size_gb:g}gb"
    if (path / _core.INDEX_FILE).exists() and _block_aligned(path):
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


def dd_direct(files: list[Path]) -> int:
    """``dd bs=8M iflag=direct`` of every file (bytes not touched); returns the bytes read."""
    for file in files:
        command = ["dd", f"if={file}", "of=/dev/null", "bs=8M", "iflag=direct"]
        subprocess.run(command, check=True, capture_output=True)
    return sum(file.stat().st_size for file in files)


OWNED = "bigmodel owned, direct reads (a budget's default)"
OWNED_FIRST = "bigmodel owned, first pass of a fresh store"
VIEWS = "bigmodel zero-copy views (zero_copy=True)"
ST_PREAD = 'safetensors load_file(backend="pread")'
ST_MMAP = "safetensors load_file (mmap, default)"
SEQUENTIAL = "sequential read (not touched)"
DD = "dd bs=8M iflag=direct (not touched)"
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
        DD: lambda: dd_direct(files),
    }


def measure(
    all_cases: dict[str, Callable[[], int]], files: list[Path], repeats: int
) -> dict[str, dict]:
    """Median GB/s (bytes read from the files / seconds) per case and temperature; the runs
    alternate round-robin, warm and cold. Warm: the files are read into the page cache
    before each case (direct reads neither use nor fill it); cold: evicted from it."""
    runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for round_number in range(repeats):
        for temperature in ("warm", "cold"):
            for name, run in all_cases.items():
                if temperature == "cold":
                    evict_from_page_cache(files)
                else:
                    sequential_read(files)
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
    baseline_kib, peak_kib = _child_figures(_RSS_CHILD, store_path, mode, budget, "peak RSS")
    return (peak_kib - baseline_kib) * 1024


def _child_figures(script: str, store_path: Path, mode: str, budget: int, what: str):
    """Runs ``script`` in a fresh process; returns the two integers its output ends with."""
    script = script.format(benchmarks=str(Path(__file__).parent))
    child = subprocess.run(
        [sys.executable, "-c", script, str(store_path), mode, str(budget)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"{what} measurement ({mode}) failed:\n{child.stderr[-3000:]}")
    return tuple(map(int, child.stdout.split()[-2:]))


_TWICE_CHILD = """
import gc, sys
sys.path.insert(0, {benchmarks!r})
import torch
import bench_store
from pathlib import Path
from bigmodel.residency import (
    evict_from_page_cache, page_cache_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
)
from bigmodel.store import TensorStore
store_path, mode, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
bench_store.touch(torch.ones(1 << 20))  # imports and first calls before the baseline
evict_from_page_cache([store_path])
zero_copy = {{"owned": None, "views": True}}[mode]
with TensorStore.open(store_path, max_resident=budget, zero_copy=zero_copy) as store:
    gc.collect()
    baseline = rss_bytes()
    reset_peak_rss()
    for _ in range(2):
        bench_store.stream(store)
    files = [f["path"] for f in store.files()]
    print(peak_rss_bytes() - baseline, page_cache_bytes(files))
"""
# Read modes of the real-memory measurement: the default for a budget, and views.
TWICE_MODES = ("owned", "views")


def real_memory_read_twice(store_path: Path, mode: str, budget: int) -> dict[str, int]:
    """A fresh process reads the store twice under ``budget``: its peak RSS growth and the
    bytes of the store's files left in the page cache afterwards."""
    rss_growth, page_cache = _child_figures(_TWICE_CHILD, store_path, mode, budget, "real memory")
    return {"rss_growth_bytes": rss_growth, "page_cache_bytes": page_cache}


def _ratio(results: dict, name: str, reference: str | None) -> str:
    if reference is None:
        return "-"
    warm, cold = (
        results[name][f"{t}_gbps"] / results[reference][f"{t}_gbps"] for t in ("warm", "cold")
    )
    return f"{warm:.2f}x / {cold:.2f}x"


def markdown_table(results: dict) -> str:
    """The README table: GB/s per case, ratios against safetensors, the sequential read and
    dd's direct read (cold)."""
    lines = [
        "| case | warm GB/s | cold GB/s | vs safetensors, same memory kind (warm / cold) "
        "| vs sequential read (warm / cold) | vs dd direct, cold |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    dd_cold = results[DD]["cold_gbps"]
    for name, numbers in results.items():
        peer = _ratio(results, name, SAFETENSORS_PEER.get(name))
        lines.append(
            f"| {name} | {numbers['warm_gbps']:.2f} | {numbers['cold_gbps']:.2f} "
            f"| {peer} | {_ratio(results, name, SEQUENTIAL)} "
            f"| {numbers['cold_gbps'] / dd_cold:.2f}x |"
        )
    return "\n".join(lines)


def check_targets(
    results: dict, peak_rss: dict[str, int], budget: int, read_twice: dict[str, dict]
) -> dict[str, dict]:
    """The targets of this machine class, each with its measured value and verdict."""
    owned = results[OWNED]
    memory_limit_mb = (1.1 * GIB_STORE_BUDGET + 64 * 10**6) / 1e6
    twice = read_twice["owned"]
    measured = {
        "owned warm GB/s >= 4.5": (owned["warm_gbps"], 4.5),
        "owned warm / safetensors pread warm >= 1.9": (
            owned["warm_gbps"] / results[ST_PREAD]["warm_gbps"],
            1.9,
        ),
        "owned cold / dd bs=8M iflag=direct cold >= 0.9": (
            owned["cold_gbps"] / results[DD]["cold_gbps"],
            0.9,
        ),
        "owned peak RSS over baseline / budget <= 1.1": (peak_rss["owned"] / budget, 1.1),
        f"1 GiB read twice at 128 MB: RSS growth MB <= {memory_limit_mb:.0f}": (
            twice["rss_growth_bytes"] / 1e6,
            memory_limit_mb,
        ),
        f"1 GiB read twice at 128 MB: page cache left MB <= {memory_limit_mb:.0f}": (
            twice["page_cache_bytes"] / 1e6,
            memory_limit_mb,
        ),
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
    gib_store = ensure_store(GIB_STORE_GB)
    read_twice = {
        mode: real_memory_read_twice(gib_store, mode, GIB_STORE_BUDGET) for mode in TWICE_MODES
    }
    targets = check_targets(results, peak_rss, budget, read_twice)
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
        "gib_store_bytes": sum(f.stat().st_size for f in shard_files(gib_store)),
        "read_twice_at_128mb": read_twice,
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
    twice = ", ".join(
        f"{mode}: RSS +{m['rss_growth_bytes'] / 1e6:.0f} MB, page cache "
        f"{m['page_cache_bytes'] / 1e6:.0f} MB"
        for mode, m in report["read_twice_at_128mb"].items()
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
        f"A {report['gib_store_bytes'] / 1e9:.2f} GB store read twice with max_resident=128 MB "
        f"(peak RSS growth, the store's bytes left in the page cache): {twice}.\n\n"
        f"{verdicts}"
    )


if __name__ == "__main__":
    main()
