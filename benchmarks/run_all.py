"""`make bench`: every benchmark, one after the other (each prints its own table).

The store and offload benchmarks build their data once under `.cache/` and reuse it;
`bench_gpu.py` says it was skipped on a machine without CUDA.
"""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = (
    "bench_store.py",
    "bench_device_map.py",
    "bench_offload.py",
    "bench_lowram.py",
    "bench_gpu.py",
)


def main() -> int:
    here = Path(__file__).parent
    for script in BENCHMARKS:
        print(f"\n=== {script} ===", flush=True)
        result = subprocess.run([sys.executable, str(here / script)], check=False)
        if result.returncode != 0:
            print(f"{script} failed with exit status {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
