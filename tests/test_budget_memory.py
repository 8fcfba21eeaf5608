"""The budget holds in real memory on every dispatch path: RSS growth and the page cache
the run leaves each stay within 1.1 x budget + 64 MB. Each case runs in a fresh process
(so RSS is the run's own) on a 100 MB model whose checkpoint is evicted from the page cache
first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

BUDGET = 20_000_000
SLACK = 64_000_000
LAYERS, WIDTH = 25, 1024  # 25 layers of 4 MB: 100 MB

PRELUDE = f"""
import json, sys, torch
from torch import nn
from bigmodel import residency
from bigmodel.utils import infer_auto_device_map
import bigmodel

class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear({WIDTH}, {WIDTH}, bias=False) for _ in range({LAYERS})
        )

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

checkpoint, folder = sys.argv[1], sys.argv[2]
residency.evict_from_page_cache([checkpoint])
baseline = residency.rss_bytes()
residency.reset_peak_rss()
"""

REPORT = f"""
x = torch.randn(2, {WIDTH})
with torch.no_grad():
    for _ in range(2):
        out = model(x)
print(json.dumps({{
    "rss": residency.peak_rss_bytes() - baseline,
    "page_cache": residency.page_cache_bytes([checkpoint]),
    "sum": float(out.sum()),
}}))
"""

CASES = {
    "two steps: a map planned with a CPU budget, then loaded": f"""
        with bigmodel.init_empty_weights():
            model = Stack()
        device_map = infer_auto_device_map(model, max_memory={{"cpu": {BUDGET}}})
        model = bigmodel.load_checkpoint_and_dispatch(
            model, checkpoint, device_map=device_map, offload_folder=folder
        )
    """,
    "load_checkpoint_and_dispatch(device_map='auto', max_memory=...)": f"""
        with bigmodel.init_empty_weights():
            model = Stack()
        model = bigmodel.load_checkpoint_and_dispatch(
            model, checkpoint, device_map="auto", max_memory={{"cpu": {BUDGET}}},
            offload_folder=folder,
        )
    """,
    "dispatch_model with transformers' offload_index": f"""
        from safetensors import safe_open
        with safe_open(checkpoint, "pt") as f:
            names = list(f.keys())
        index = {{
            name: {{"safetensors_file": checkpoint, "weight_name": name, "dtype": "float32"}}
            for name in names
        }}
        with bigmodel.init_empty_weights():
            model = Stack()
        device_map = {{f"layers.{{n}}": "disk" for n in range({LAYERS})}}
        bigmodel.dispatch_model(
            model, device_map, main_device="cpu", offload_index=index, max_resident={BUDGET}
        )
    """,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    layers = {f"layers.{n}.weight": torch.randn(WIDTH, WIDTH) / WIDTH**0.5 for n in range(LAYERS)}
    path = folder / "model.safetensors"
    save_file(layers, path)
    return path


def _run(code: str, checkpoint, folder) -> dict:
    script = PRELUDE + textwrap.dedent(code) + REPORT
    result = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint), str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_the_budget_holds_in_rss_and_page_cache(case, checkpoint, tmp_path):
    figures = _run(CASES[case], checkpoint, tmp_path / "offload")
    limit = 1.1 * BUDGET + SLACK
    assert figures["page_cache"] <= limit, figures
    assert figures["rss"] <= limit, figures


def test_the_unbudgeted_baseline_would_not_hold(checkpoint, tmp_path):
    """The bound is not vacuous: the same model with no budget keeps all of it."""
    in_ram = """
        with bigmodel.init_empty_weights():
            model = Stack()
        model = bigmodel.load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})
    """
    figures = _run(in_ram, checkpoint, tmp_path / "offload")
    assert figures["page_cache"] > 1.1 * BUDGET + SLACK
