#!/usr/bin/env bash
# The GPU verification of issue 12, in one run: builds the Rust extension, runs the
# host-to-device tests and the offloaded-model GPU tests, then the GPU benchmark, and
# writes everything under $OUT (default: ./gpu-check-results).
#
#   OUT=/some/folder PYTHON=/path/to/python benchmarks/gpu_check.sh
#
# Run from the repository root on a machine with an NVIDIA GPU, a Rust toolchain, and a
# Python with torch (CUDA build), transformers, accelerate and pytest. Exits non-zero when
# any step fails; every step still runs, and summary.txt lists each step's status.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() {  # step NAME COMMAND...: runs COMMAND, its output in $OUT/NAME.log
    local name=$1
    shift
    local started=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

: >"$OUT/summary.txt"
step machine sh -c "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))'"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PYTHON: nothing verified" | tee -a "$OUT/summary.txt"
    exit 1
fi
step build sh -c "cargo build --release -p bigmodel-py && cp target/release/lib_core.so python/bigmodel/_core.abi3.so" || exit 1
# -rs lists skipped tests: on a GPU machine nothing here may be skipped.
step tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_transfer.py tests/test_copy_window.py tests/test_gpu_offload.py
if grep -q "SKIPPED" "$OUT/tests.log"; then
    echo "tests: some were skipped on the GPU machine (see tests.log)" | tee -a "$OUT/summary.txt"
    status=1
fi
step bench_gpu "$PYTHON" benchmarks/bench_gpu.py --repeats 5
cp "$OUT/bench_gpu.log" "$OUT/bench_gpu.md" 2>/dev/null
exit "$status"
