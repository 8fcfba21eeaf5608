"""Host-to-device copies on one CUDA GPU: raw rates, `HostToDevice`, an offloaded forward.

(a) The pinned rate (one big page-locked buffer copied with ``non_blocking``, timed with CUDA
    events) and the pageable rate (the same bytes from ordinary memory): the hardware's best
    and what a plain ``.to(device)`` gets.
(b) About 200 weight-sized fp16 tensors (4-12 MiB, 1.5 GiB in all), from RAM and as zero-copy
    views of a store in the page cache, copied with ``.to(device)`` and with
    `HostToDevice.copy`, as a fraction of the pinned rate (goal: >= 0.85).
(c) A small fp16 Llama (8 layers x 2048 hidden) with every decoder layer on "cpu", then on
    "disk", run on the GPU (`dispatch_model`, bigmodel's and accelerate's in the same run):
    the forward of a prompt and the decode time per token, against the floor
    max(the same on the GPU alone, offloaded bytes / pinned rate) (goal: <= 1.10x floor,
    >= 3x faster than accelerate), and whether the logits equal the GPU-only model's.

Every time is a median of ``--repeats`` runs, each ending with the device synchronized.
Without a CUDA device it prints why and exits (status 0: nothing to measure).

    python benchmarks/bench_gpu.py [--repeats 5] [--tokens 512] [--no-model]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_description  # noqa: E402

from bigmodel import dispatch_model  # noqa: E402
from bigmodel.store import TensorStore, write_store  # noqa: E402
from bigmodel.transfer import HostToDevice  # noqa: E402

MIB = 2**20
GB = 1e9
RAW_COPY_BYTES = 2**30
WEIGHT_MIBS = (4, 6, 8, 12)  # cycled over the tensors: 7.5 MiB on average
WEIGHT_COUNT = 200
WEIGHT_COLUMNS = 2048  # fp16: 4 KiB per row
COPY_GOAL = 0.85
FORWARD_GOAL = 1.10
SPEEDUP_GOAL = 3.0


def device_seconds(func: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``func()`` and of the device work it queued."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        func()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def event_seconds(func: Callable[[], object], repeats: int) -> float:
    """Median device time of the work ``func()`` queues on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        func()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# -- (a) raw rates ---------------------------------------------------------------------


def raw_rates(device: torch.device, repeats: int) -> tuple[float, float]:
    """(pinned, pageable) host-to-device rates in bytes/s."""
    destination = torch.empty(RAW_COPY_BYTES, dtype=torch.uint8, device=device)
    pinned = torch.ones(RAW_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    pinned_s = event_seconds(lambda: destination.copy_(pinned, non_blocking=True), repeats)
    pageable = torch.ones(RAW_COPY_BYTES, dtype=torch.uint8)
    pageable_s = device_seconds(lambda: destination.copy_(pageable), repeats)
    return RAW_COPY_BYTES / pinned_s, RAW_COPY_BYTES / pageable_s


# -- (b) many weights --------------------------------------------------------------------


def make_weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    sizes = [WEIGHT_MIBS[i % len(WEIGHT_MIBS)] for i in range(WEIGHT_COUNT)]
    rows = [mib * MIB // (2 * WEIGHT_COLUMNS) for mib in sizes]
    return [torch.empty(r, WEIGHT_COLUMNS, dtype=torch.float16).normal_() for r in rows]


def copy_rates(weights: list[torch.Tensor], device, repeats: int) -> dict[str, float]:
    """Bytes/s of copying all ``weights`` with ``.to`` and with a fresh `HostToDevice`
    (after one warm-up pass that pins its staging buffers); checks the copies first."""
    copier = HostToDevice(device)
    for weight in weights[:8]:
        assert torch.equal(copier.copy(weight).cpu(), weight), "HostToDevice copy differs"
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rates = {
        ".to(device)": nbytes / device_seconds(lambda: [w.to(device) for w in weights], repeats),
        "HostToDevice.copy": nbytes
        / device_seconds(lambda: [copier.copy(w) for w in weights], repeats),
    }
    stats = copier.stats()
    print(f"  HostToDevice: waits {stats['waits']}, pinned {stats['pinned_bytes'] / MIB:.0f} MiB")
    return rates


def store_views(weights: list[torch.Tensor], folder: Path) -> tuple[TensorStore, list]:
    """The weights as zero-copy views of a store (its pages in the page cache)."""
    write_store(folder, {f"w{i}": w for i, w in enumerate(weights)}, progress=False)
    store = TensorStore.open(folder)
    return store, [store[f"w{i}"] for i in range(len(weights))]


# -- (c) offloaded forward -----------------------------------------------------------------


def llama(layers: int = 8, hidden: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float16).eval()


def layers_on(model, place: str) -> dict[str, str | int]:
    """Every decoder layer on ``place`` ("cpu" or "disk": offloaded, run on GPU 0),
    everything else on GPU 0."""
    device_map: dict[str, str | int] = {"lm_head": 0}
    for name, _ in model.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = 0
    for index in range(len(model.model.layers)):
        device_map[f"model.layers.{index}"] = place
    return device_map


def dispatched(library: str, model, place: str, folder: Path):
    """``model`` dispatched by ``library`` ("bigmodel" or "accelerate") with its layers
    on ``place``."""
    if library == "accelerate":
        from accelerate import dispatch_model as dispatch
    else:
        dispatch = dispatch_model
    offload_dir = folder / f"{library}-{place}"
    return dispatch(model, layers_on(model, place), main_device=0, offload_dir=offload_dir)


def decode_seconds(model, prompt: torch.Tensor, repeats: int, new_tokens: int = 16) -> float:
    """Seconds per generated token (greedy), the prompt's forward excluded."""

    def generate(count: int):
        return lambda: model.generate(
            prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False
        )

    return (
        device_seconds(generate(new_tokens + 1), repeats) - device_seconds(generate(1), repeats)
    ) / new_tokens


def forward_figures(repeats: int, tokens: int, folder: Path) -> dict:
    """Forward and decode times of the model on the GPU and with its layers on "cpu" and
    "disk" (bigmodel and accelerate), offloaded bytes, whether the logits are equal."""
    model = llama()
    layer_bytes = sum(
        t.numel() * t.element_size() for t in model.model.layers.state_dict().values()
    )
    input_ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda:0")
    prompt = input_ids[:, :16]
    figures: dict = {"layer_bytes": layer_bytes}
    on_gpu = copy.deepcopy(model).to("cuda:0")
    with torch.inference_mode():
        expected = on_gpu(input_ids).logits
        figures["gpu"] = {
            "forward_s": device_seconds(lambda m=on_gpu: m(input_ids), repeats),
            "decode_s": decode_seconds(on_gpu, prompt, repeats),
        }
    del on_gpu
    for place in ("cpu", "disk"):
        for library in ("bigmodel", "accelerate"):
            offloaded = dispatched(library, copy.deepcopy(model), place, folder)
            with torch.inference_mode():
                same = torch.equal(offloaded(input_ids).logits, expected)  # also the warm-up
                figures[(library, place)] = {
                    "forward_s": device_seconds(lambda m=offloaded: m(input_ids), repeats),
                    "decode_s": decode_seconds(offloaded, prompt, repeats),
                    "same_logits": same,
                }
            del offloaded
            torch.cuda.empty_cache()
    return figures


# -- report --------------------------------------------------------------------------------


def _row(name: str, value: str, goal: str = "", met: bool | None = None) -> str:
    return f"| {name} | {value} | {goal} | {'' if met is None else 'yes' if met else 'NO'} |"


def copy_rows(source: str, rates: dict[str, float], pinned: float) -> list[str]:
    rows = []
    for method, rate in rates.items():
        ratio = rate / pinned
        goal = method.startswith("HostToDevice")
        rows.append(
            _row(
                f"{WEIGHT_COUNT} weights from {source}, {method}",
                f"{rate / GB:.1f} GB/s ({ratio:.2f}x pinned)",
                f">= {COPY_GOAL}x pinned" if goal else "",
                ratio >= COPY_GOAL if goal else None,
            )
        )
    return rows


def forward_rows(figures: dict, pinned: float, tokens: int) -> list[str]:
    gpu, streamed_s = figures["gpu"], figures["layer_bytes"] / pinned
    rows = [
        _row(
            f"Llama 8x2048 fp16 on GPU: forward of {tokens} tokens / decode per token",
            f"{gpu['forward_s'] * 1e3:.1f} ms / {gpu['decode_s'] * 1e3:.2f} ms",
        )
    ]
    for place in ("cpu", "disk"):
        ours, theirs = figures[("bigmodel", place)], figures[("accelerate", place)]
        for step in ("forward", "decode"):
            floor = max(gpu[f"{step}_s"], streamed_s)
            ratio = ours[f"{step}_s"] / floor
            speedup = theirs[f"{step}_s"] / ours[f"{step}_s"]
            rows.append(
                _row(
                    f"layers on {place}, {step}",
                    f"bigmodel {ours[f'{step}_s'] * 1e3:.1f} ms ({ratio:.2f}x floor "
                    f"{floor * 1e3:.1f} ms), accelerate {theirs[f'{step}_s'] * 1e3:.1f} ms "
                    f"({speedup:.1f}x); logits {'equal' if ours['same_logits'] else 'DIFFER'}",
                    f"<= {FORWARD_GOAL}x floor, >= {SPEEDUP_GOAL}x accelerate",
                    ratio <= FORWARD_GOAL and speedup >= SPEEDUP_GOAL and ours["same_logits"],
                )
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--no-model", action="store_true", help="skip the Llama forward")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: skipped, no CUDA device (torch.cuda.is_available() is False)")
        return 0
    device = torch.device("cuda", 0)
    print(
        f"{torch.cuda.get_device_name(device)}; {machine_description()}; "
        f"{torch.get_num_threads()} torch threads",
        flush=True,
    )

    pinned, pageable = raw_rates(device, args.repeats)
    rows = [
        "| measurement | result | goal | met |",
        "|---|---|---|---|",
        _row("pinned host-to-device, 1 GiB", f"{pinned / GB:.1f} GB/s"),
        _row(
            "pageable host-to-device, 1 GiB",
            f"{pageable / GB:.1f} GB/s ({pageable / pinned:.2f}x pinned)",
        ),
    ]
    weights = make_weights()
    rows += copy_rows("RAM", copy_rates(weights, device, args.repeats), pinned)
    with tempfile.TemporaryDirectory() as folder:
        store, views = store_views(weights, Path(folder) / "store")
        del weights
        rows += copy_rows("store views", copy_rates(views, device, args.repeats), pinned)
        del views
        store.close()
    if not args.no_model:
        with tempfile.TemporaryDirectory() as folder:
            figures = forward_figures(args.repeats, args.tokens, Path(folder))
        rows += forward_rows(figures, pinned, args.tokens)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
