"""infer_auto_device_map on two 40k-module models: bigmodel vs accelerate.

The model is a GPT-2 skeleton built on the meta device (no memory): token embedding tied
to the output head, position embedding, N blocks of fused attention + MLP (10 modules each;
4000 blocks by default, 40k modules), a final norm. The budget spreads it over three GPUs,
the CPU and the disk, so the planner has to split the block list, move between devices and
keep the tied pair together.

The second model is shaped like a mixture of experts: 200 blocks of 64 small experts
(39,204 modules), planned with ``{"cpu": "20MB"}``, so nearly everything goes to disk.

Both libraries plan the same model with the same budget, alternating, and the maps must be
identical (same keys, devices and order). Prints the median times and the speed-up.

    .venv/bin/python benchmarks/bench_device_map.py [--blocks 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import modeling as accelerate_modeling
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, median_of_alternating  # noqa: E402

from bigmodel.utils import compute_module_sizes, infer_auto_device_map  # noqa: E402


class Attention(nn.Module):
    """GPT-2 attention: one fused q/k/v projection and the output projection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(4 * dim, dim)


class Block(nn.Module):
    """A GPT-2 block (inference: no dropout): 10 modules."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)


class GPT(nn.Module):
    def __init__(self, n_blocks: int, dim: int, vocab: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(1024, dim)
        self.h = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2


class Expert(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)


class MoEBlock(nn.Module):
    """A mixture-of-experts block: a norm, a router and ``experts`` small MLPs."""

    def __init__(self, dim: int, experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim) for _ in range(experts))


class MoE(nn.Module):
    def __init__(self, n_blocks: int, experts: int, dim: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(MoEBlock(dim, experts) for _ in range(n_blocks))
        self.head = nn.Linear(dim, vocab)


def build_moe() -> nn.Module:
    """200 blocks x 64 experts: 39,204 modules."""
    with torch.device("meta"):
        return MoE(200, experts=64, dim=64, vocab=1000)


def build_model(n_blocks: int) -> nn.Module:
    with torch.device("meta"):
        return GPT(n_blocks, dim=256, vocab=32000)


def budget_for(model: nn.Module) -> dict:
    """Three GPUs holding about 70% of the model, a CPU holding 20%, the rest on disk."""
    total = compute_module_sizes(model)[""]
    return {
        0: int(total * 0.25),
        1: int(total * 0.25),
        2: int(total * 0.2),
        "cpu": int(total * 0.2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4000, help="GPT-2 blocks (10 modules each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    args = parser.parse_args()

    # accelerate warns once per GPU id that this host does not have; that is expected here.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("bigmodel").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", UserWarning)

    print(f"machine: {machine_description()}")
    shapes = {
        "GPT-2-shaped": (build_model(args.blocks), None),
        "mixture-of-experts-shaped": (build_moe(), {"cpu": "20MB"}),
    }
    for shape, (model, max_memory) in shapes.items():
        compare(shape, model, max_memory or budget_for(model), args.repeats)


def compare(shape: str, model: nn.Module, max_memory: dict, repeats: int) -> None:
    """Plans ``model`` with both libraries, alternating; prints times and the speed-up."""
    n_modules = sum(1 for _ in model.named_modules())
    plans = {
        "bigmodel": lambda: infer_auto_device_map(model, max_memory=dict(max_memory)),
        "accelerate": lambda: accelerate_modeling.infer_auto_device_map(
            model, max_memory=dict(max_memory)
        ),
    }
    ours, theirs = plans["bigmodel"](), plans["accelerate"]()
    if list(ours.items()) != list(theirs.items()):
        raise SystemExit(f"{shape}: the device maps differ: the comparison would be meaningless")
    wall = median_of_alternating(plans, repeats=repeats)
    cpu = median_cpu_times(plans, repeats=repeats)
    devices = sorted(map(str, set(ours.values())))
    print(f"\n{shape} model: {n_modules} modules, {len(ours)} map entries, devices {devices}")
    print(f"median of {repeats} alternating runs:   wall s    CPU s")
    for name in ("accelerate", "bigmodel"):
        print(f"{name:>10} infer_auto_device_map: {wall[name]:7.3f}  {cpu[name]:7.3f}")
    print(
        f"speed-up (maps identical): {wall['accelerate'] / wall['bigmodel']:.1f}x wall, "
        f"{cpu['accelerate'] / cpu['bigmodel']:.1f}x CPU"
    )


def median_cpu_times(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU time of each case, run round-robin: steadier than wall time on a machine
    that other processes load (both planners are single-threaded Python)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            started = time.process_time()
            case()
            times[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()
