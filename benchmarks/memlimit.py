"""Runs a command in a memory cgroup of its own, as in a container with a memory limit.

The kernel charges the group for the memory its processes use and for the page cache their
reads bring in, and holds the total at LIMIT_MB: it reclaims the group's page cache first,
and kills a process of the group when that is not enough. So this limits exactly what a
RAM budget is about, for one command, while the rest of the machine goes on.

    python benchmarks/memlimit.py LIMIT_MB -- COMMAND [ARGS...]

Prints one line to stderr: ``memlimit: {"limit_mb": ..., "peak_mb": ..., "killed": ...}``
(peak_mb: the most the group was charged: memory plus page cache). Exit status: COMMAND's, or
3 when the kernel killed it for memory. Linux, root, cgroup v1 or v2. Pages already in the page
cache before the command runs were charged to whoever read them first: evict the command's
input files first (``bigmodel.residency.evict_from_page_cache``) for a fair count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXIT_KILLED = 3
_V2_ROOT = Path("/sys/fs/cgroup")
_V1_ROOT = Path("/sys/fs/cgroup/memory")


class MemoryGroup:
    """A fresh cgroup with a memory limit (v2 when the unified hierarchy has the memory
    controller, else v1)."""

    def __init__(self, limit_bytes: int):
        name = f"bigmodel-memlimit-{os.getpid()}"
        v2 = (_V2_ROOT / "cgroup.controllers").is_file() and "memory" in (
            _V2_ROOT / "cgroup.controllers"
        ).read_text().split()
        self.v2 = v2
        self.path = (_V2_ROOT if v2 else _V1_ROOT) / name
        self.path.mkdir()
        if v2:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def enter(self) -> None:
        """Moves the calling process into the group (call in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def kills(self) -> int:
        """How many processes of the group the kernel killed for memory."""
        events = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / events).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        if not self.v2:
            (self.path / "memory.force_empty").write_text("0")
        self.path.rmdir()


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    limit = int(sys.argv[1]) * 2**20
    group = MemoryGroup(limit)
    try:
        returncode = subprocess.call(sys.argv[3:], preexec_fn=group.enter)
        killed = group.kills() > 0 or returncode == -9
        report = {"limit_mb": limit / 1e6, "peak_mb": group.peak_bytes() / 1e6, "killed": killed}
    finally:
        group.remove()
    print(f"memlimit: {json.dumps(report)}", file=sys.stderr, flush=True)
    return EXIT_KILLED if killed else returncode


if __name__ == "__main__":
    sys.exit(main())
