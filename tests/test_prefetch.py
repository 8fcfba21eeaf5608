"""Read-ahead: order recording, hits from the second forward on, order changes, budgets."""

from __future__ import annotations

import torch
from torch import nn

from bigmodel import disk_offload
from bigmodel.hooks import iter_offload_hooks
from bigmodel.prefetch import ForwardOrderPrefetcher, attach_prefetcher, offload_stats

WIDTH = 128
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4


class Stack(nn.Module):
    """Linear layers run front to back, or back to front when ``reverse`` is set."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))
        self.reverse = False

    def forward(self, x):
        layers = reversed(self.layers) if self.reverse else self.layers
        for layer in layers:
            x = torch.tanh(layer(x))
        return x


def _offloaded(tmp_path, **kwargs) -> tuple[Stack, Stack]:
    torch.manual_seed(0)
    reference = Stack().eval()
    model = Stack().eval()
    model.load_state_dict(reference.state_dict())
    disk_offload(model, tmp_path / "offload", execution_device="cpu", **kwargs)
    return reference, model


def _prefetcher(model: nn.Module) -> ForwardOrderPrefetcher:
    prefetchers = {id(hook.prefetcher): hook.prefetcher for _, _, hook in iter_offload_hooks(model)}
    assert len(prefetchers) == 1, "every offloaded module shares one prefetcher"
    return next(iter(prefetchers.values()))


def test_disk_offload_installs_a_prefetcher_that_records_the_forward_order(tmp_path):
    _, model = _offloaded(tmp_path)
    prefetcher = _prefetcher(model)
    with torch.no_grad():
        model(torch.randn(2, WIDTH))
        model(torch.randn(2, WIDTH))
    hooks_in_module_order = [hook for _, _, hook in iter_offload_hooks(model)]
    assert prefetcher.order == hooks_in_module_order


def test_every_forward_is_served_by_prefetches(tmp_path):
    # A budget of half the model: every forward must read its weights again.
    _, model = _offloaded(tmp_path, max_resident=3 * LAYER_BYTES)
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        model(x)  # read ahead along the guessed order (registration order)
        first = offload_stats(model)["prefetch_hits"]
        model(x)  # the order recorded by the first forward
    stats = offload_stats(model)
    assert first > 0
    assert stats["prefetch_hits"] > first
    assert stats["prefetch_requests"] > 0


def test_outputs_stay_exact_when_the_order_changes(tmp_path):
    reference, model = _offloaded(tmp_path)
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        for reverse in (False, False, True, True, False):
            reference.reverse = model.reverse = reverse
            assert torch.equal(model(x), reference(x))


class Branchy(Stack):
    """A Stack whose ``head`` layer runs only when ``use_head`` is set."""

    def __init__(self):
        super().__init__(depth=3)
        self.head = nn.Linear(WIDTH, WIDTH)
        self.use_head = False

    def forward(self, x):
        x = super().forward(x)
        return self.head(x) if self.use_head else x


def test_a_module_on_a_new_code_path_runs_exactly_and_keeps_its_place(tmp_path):
    torch.manual_seed(0)
    reference, model = Branchy().eval(), Branchy().eval()
    model.load_state_dict(reference.state_dict())
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    prefetcher = _prefetcher(model)
    x = torch.randn(1, WIDTH)
    layers = [layer._hf_hook for layer in model.layers]
    with torch.no_grad():
        model(x)
        model(x)
        # The head was guessed (registration order) but never ran: it stays, last.
        assert prefetcher.order == [*layers, model.head._hf_hook]
        reference.use_head = model.use_head = True
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), reference(x))
    assert prefetcher.order == [*layers, model.head._hf_hook]


def test_read_ahead_respects_the_store_budget(tmp_path):
    budget = 3 * LAYER_BYTES
    _, model = _offloaded(tmp_path, max_resident=budget)
    prefetcher = _prefetcher(model)
    assert prefetcher.lookahead_bytes == budget // 2
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        for _ in range(5):
            model(x)
            stats = offload_stats(model)
            assert stats["resident_bytes"] <= budget + stats["pinned_bytes"]
    stats = offload_stats(model)
    # At most one module is pinned at a time (its forward), so the peak is bounded by it.
    assert stats["peak_resident_bytes"] <= budget + LAYER_BYTES
    assert stats["prefetch_hits"] > 0


def test_attach_prefetcher_is_none_without_a_store():
    model = Stack()
    assert attach_prefetcher(model) is None
