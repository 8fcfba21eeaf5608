"""Helpers shared by the benchmarks: timing, reads, the machine; memory probes re-exported
from `bigmodel.residency`."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bigmodel.residency import evict_from_page_cache, reset_peak_rss, status_kib  # noqa: F401


def sequential_read(paths: Iterable[Path], chunk: int = 16 << 20) -> int:
    """Reads the files front to back into one reused buffer; returns the bytes read."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def median_of_alternating(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Runs the cases round-robin ``repeats`` times (so drift hits all alike); medians in s."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            if before_each is not None:
                before_each()
            times[name].append(timed(case))
    return {name: statistics.median(values) for name, values in times.items()}


def machine_description() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM"
