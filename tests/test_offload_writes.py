"""Writes to offloaded tensors stay private: they never reach the store's shared bytes."""

from __future__ import annotations

import accelerate
import torch
from torch import nn

from bigmodel import disk_offload
from bigmodel.prefetch import offload_stores

WIDTH = 64
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.BatchNorm1d(WIDTH)

    def forward(self, x):
        return self.norm(self.linear(x))


def test_a_module_writing_its_offloaded_buffers_gets_private_copies(tmp_path):
    """Batch-norm statistics updated in train mode never reach the store's bytes (which
    other holders share, and which eviction would half undo): as with accelerate's disk
    offload, each forward starts from the stored statistics."""
    torch.manual_seed(0)
    ours, theirs = Normed().train(), Normed().train()
    theirs.load_state_dict(ours.state_dict())
    stored_mean = ours.norm.running_mean.clone()
    disk_offload(ours, tmp_path / "ours", "cpu", offload_buffers=True, max_resident=LAYER_BYTES)
    accelerate.disk_offload(theirs, tmp_path / "theirs", "cpu", offload_buffers=True)
    (store,) = offload_stores(ours)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(8, WIDTH)
            assert torch.equal(ours(x), theirs(x))
    assert torch.equal(store["norm.running_mean"], stored_mean)
