"""Host-to-device copies: the staging pool's bookkeeping (CPU), device parsing, and the CUDA
copies themselves (skipped without a CUDA device)."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from torch import nn

from bigmodel import transfer
from bigmodel.store import TensorStore, write_store
from bigmodel.transfer import HostToDevice, StagingPool, host_to_device

KIB = 2**10
MIB = 2**20

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeEvent:
    """Stands for a CUDA event: pending until marked done or synchronized."""

    def __init__(self, done: bool = False):
        self.done = done
        self.synchronized = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True


class CountingAllocator:
    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)


def _run_in_threads(work, count: int) -> None:
    """Runs ``work(seed)`` for seeds 0..count-1, each on its own thread, and waits for all."""
    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _pool(max_bytes=16 * KIB, max_buffer_bytes=4 * KIB, min_buffer_bytes=KIB):
    allocator = CountingAllocator()
    return StagingPool(allocator, max_bytes, max_buffer_bytes, min_buffer_bytes), allocator


# --------------------------------------------------------------------------------------
# StagingPool (CPU)
# --------------------------------------------------------------------------------------


def test_buffer_sizes_are_powers_of_two_between_the_bounds():
    pool, _ = _pool(max_bytes=64 * KIB, max_buffer_bytes=16 * KIB)
    assert [pool.buffer_size(n) for n in (0, 1, KIB, KIB + 1, 3000, 16 * KIB)] == [
        KIB,
        KIB,
        KIB,
        2 * KIB,
        4 * KIB,
        16 * KIB,
    ]
    with pytest.raises(ValueError, match="exceed the largest buffer"):
        pool.buffer_size(16 * KIB + 1)


def test_the_largest_buffer_never_exceeds_the_bound():
    pool, _ = _pool(max_bytes=8 * KIB, max_buffer_bytes=1 * MIB)
    assert pool.max_buffer_bytes == 8 * KIB
    assert pool.buffer_size(8 * KIB) == 8 * KIB


def test_a_buffer_is_reused_only_after_its_event_completed():
    pool, allocator = _pool()
    first = pool.acquire(3000)
    event = FakeEvent()
    pool.release(first, event)

    second = pool.acquire(3000)
    assert second.data_ptr() != first.data_ptr()  # the first is still being read
    pool.release(second, FakeEvent())

    event.done = True
    third = pool.acquire(3000)
    assert third.data_ptr() == first.data_ptr()
    assert allocator.sizes == [4 * KIB, 4 * KIB]
    assert event.synchronized == 0 and pool.stats()["waits"] == 0


def test_the_smallest_free_buffer_that_fits_is_reused():
    pool, allocator = _pool()
    small, large = pool.acquire(KIB), pool.acquire(4 * KIB)
    pool.release(large, FakeEvent(done=True))
    pool.release(small, FakeEvent(done=True))

    assert pool.acquire(500).data_ptr() == small.data_ptr()
    assert pool.acquire(2 * KIB).data_ptr() == large.data_ptr()  # no 2 KiB buffer: the 4 KiB
    assert allocator.sizes == [KIB, 4 * KIB]


def test_a_full_pool_waits_for_the_oldest_buffer_in_flight():
    pool, allocator = _pool(max_bytes=16 * KIB, max_buffer_bytes=4 * KIB)
    buffers = [pool.acquire(4 * KIB) for _ in range(4)]
    events = [FakeEvent() for _ in buffers]
    for buffer, event in zip(buffers, events, strict=True):
        pool.release(buffer, event)

    reused = pool.acquire(4 * KIB)

    assert reused.data_ptr() == buffers[0].data_ptr()
    assert [event.synchronized for event in events] == [1, 0, 0, 0]
    assert pool.stats() == {"pinned_bytes": 16 * KIB, "waits": 1}
    assert len(allocator.sizes) == 4


def test_completed_buffers_are_reused_without_waiting():
    pool, _ = _pool(max_bytes=8 * KIB, max_buffer_bytes=4 * KIB)
    first, second = pool.acquire(4 * KIB), pool.acquire(4 * KIB)
    events = [FakeEvent(), FakeEvent()]
    pool.release(first, events[0])
    pool.release(second, events[1])

    for event in events:
        event.done = True
    reused = {pool.acquire(4 * KIB).data_ptr(), pool.acquire(4 * KIB).data_ptr()}

    assert reused == {first.data_ptr(), second.data_ptr()}
    assert pool.stats()["waits"] == 0
    assert [event.synchronized for event in events] == [0, 0]


def test_free_buffers_of_other_sizes_make_room_when_nothing_is_in_flight():
    pool, allocator = _pool(max_bytes=8 * KIB, max_buffer_bytes=8 * KIB)
    small = [pool.acquire(KIB) for _ in range(8)]
    for buffer in small:
        pool.release(buffer, FakeEvent(done=True))

    large = pool.acquire(8 * KIB)

    assert large.numel() == 8 * KIB
    assert pool.stats() == {"pinned_bytes": 8 * KIB, "waits": 0}
    assert allocator.sizes == [KIB] * 8 + [8 * KIB]


def test_the_bound_holds_for_any_mix_of_sizes():
    pool, _ = _pool(max_bytes=32 * KIB, max_buffer_bytes=8 * KIB)
    rng = random.Random(0)
    pending: list[FakeEvent] = []
    for _ in range(500):
        nbytes = rng.randint(0, 8 * KIB)
        buffer = pool.acquire(nbytes)
        assert buffer.numel() >= nbytes
        event = FakeEvent()
        pool.release(buffer, event)
        pending.append(event)
        if rng.random() < 0.3:  # some work completes, oldest first
            for event in pending[: rng.randint(1, len(pending))]:
                event.done = True
        assert pool.stats()["pinned_bytes"] <= 32 * KIB
    assert pool.stats()["waits"] > 0


def test_a_failed_allocation_holds_no_bytes():
    def failing(nbytes):
        raise RuntimeError("no pinned memory")

    pool = StagingPool(failing, 16 * KIB, 4 * KIB, KIB)
    with pytest.raises(RuntimeError, match="no pinned memory"):
        pool.acquire(KIB)
    assert pool.stats()["pinned_bytes"] == 0


def test_a_buffer_has_one_owner_at_a_time_across_threads():
    pool, _ = _pool(max_bytes=16 * KIB, max_buffer_bytes=4 * KIB)
    owned: set[int] = set()
    owned_lock = threading.Lock()
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            buffer = pool.acquire(rng.randint(1, 4 * KIB))
            with owned_lock:
                if buffer.data_ptr() in owned:
                    errors.append("a buffer was handed out twice")
                owned.add(buffer.data_ptr())
            buffer.fill_(seed)
            if not bool((buffer == seed).all()):
                errors.append("a buffer was written by another owner")
            with owned_lock:
                owned.discard(buffer.data_ptr())
            pool.release(buffer, FakeEvent(done=rng.random() < 0.5))

    _run_in_threads(work, 4)
    assert errors == []
    assert pool.stats()["pinned_bytes"] <= 16 * KIB


# --------------------------------------------------------------------------------------
# Byte layout (CPU): what the staged copy moves as one block of bytes
# --------------------------------------------------------------------------------------


def _layout_cases() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "contiguous": base,
        "transposed": base.t(),
        "strided slice": base[:, ::2],
        "offset view": base[1:3],
        "expanded": torch.arange(3.0).expand(4, 3),
        "size-1 dims": torch.arange(6.0).reshape(6, 1).as_strided((6, 1), (1, 7)),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "bfloat16": torch.randn(5, 7).to(torch.bfloat16).t(),
        "bool": torch.tensor([[True, False], [False, True]]).t(),
    }


@pytest.mark.parametrize("name", list(_layout_cases()))
def test_the_bytes_of_a_layout_rebuild_the_tensor(name):
    tensor = _layout_cases()[name]
    destination = torch.empty_like(tensor)  # what `copy` allocates on the device
    source = transfer._laid_out_like(tensor, destination)

    transfer._flat_bytes(destination).copy_(transfer._flat_bytes(source))

    assert torch.equal(destination, tensor)
    if name in ("transposed", "channels_last"):
        assert source is tensor and destination.stride() == tensor.stride()  # no host copy


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (0, torch.device("cuda", 0)),
        (1, torch.device("cuda", 1)),
        ("cuda", torch.device("cuda")),
        ("cuda:1", torch.device("cuda", 1)),
        (torch.device("cuda", 1), torch.device("cuda", 1)),
        ("cpu", None),
        (torch.device("cpu"), None),
        ("meta", None),
        ("mps", None),
        ("disk", None),
        (True, None),
    ],
)
def test_cuda_device_forms(device, expected):
    assert transfer._cuda_device(device) == expected


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta", "mps", "disk"])
def test_no_copier_for_devices_that_are_not_cuda(device):
    assert host_to_device(device) is None


@pytest.mark.parametrize("device", [0, "cuda", "cuda:0", torch.device("cuda", 0)])
def test_no_copier_without_cuda(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host_to_device(device) is None


def test_host_to_device_refuses_other_devices():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        HostToDevice("cpu")


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)


def _shapes_and_views(dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        _random(dtype, ()),
        _random(dtype, (0, 16)),
        _random(dtype, (7,)),
        _random(dtype, (33, 65)),
        _random(dtype, (1024, 1536)),  # bigger than one staging buffer: staged in pieces
        _random(dtype, (64, 96)).t(),
        _random(dtype, (64, 96))[:, ::3],
        _random(dtype, (64, 96))[5:9],
        _random(dtype, (96,)).expand(4, 96),
    ]


@pytest.fixture
def copier():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Small buffers and bound, so that pieces, reuse and waiting all happen.
    return HostToDevice("cuda", max_pinned_bytes=4 * MIB, max_buffer_bytes=MIB)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_copies_are_bit_exact(copier, dtype):
    for tensor in _shapes_and_views(dtype):
        copied = copier.copy(tensor)
        expected = tensor.to(copier.device)
        assert copied.device == copier.device
        assert (copied.dtype, copied.shape, copied.stride()) == (
            expected.dtype,
            expected.shape,
            expected.stride(),
        )
        assert torch.equal(_bits(copied), _bits(tensor))


@needs_cuda
def test_pinned_cuda_and_parameter_inputs(copier):
    pinned = _random(torch.float16, (256, 256)).pin_memory()
    copied = copier.copy(pinned)
    assert torch.equal(copied.cpu(), pinned)
    assert copier.stats()["staged_bytes"] == 0  # pinned memory is copied without staging

    on_device = torch.ones(3, device=copier.device)
    assert copier.copy(on_device) is on_device

    parameter = nn.Parameter(_random(torch.float32, (8, 8)))
    copied = copier.copy(parameter)
    assert torch.equal(copied.cpu(), parameter.detach()) and not copied.requires_grad


@needs_cuda
def test_zero_copy_store_views(copier, tmp_path):
    tensors = {"w": _random(torch.bfloat16, (512, 1024)), "b": _random(torch.bfloat16, (1024,))}
    write_store(tmp_path / "store", tensors, progress=False)
    store = TensorStore.open(tmp_path / "store")
    for name, tensor in tensors.items():
        assert torch.equal(copier.copy(store[name]).cpu(), tensor)
    assert copier.stats()["staged_bytes"] == sum(t.numel() * 2 for t in tensors.values())


@needs_cuda
def test_a_copy_is_ready_for_the_current_stream(copier):
    tensor = _random(torch.float32, (1024, 1024))
    with torch.cuda.stream(torch.cuda.Stream(copier.device)):
        # Delay the side stream: a kernel that did not wait for the copy would read garbage.
        with torch.cuda.stream(copier.stream):
            torch.cuda._sleep(50_000_000)
        result = copier.copy(tensor) * 2
        assert torch.equal(result.cpu(), tensor * 2)


@needs_cuda
def test_staging_buffers_are_not_overwritten_while_in_flight(copier):
    tensors = [torch.full((256, 1024), float(i)) for i in range(40)]  # 1 MiB each
    with torch.cuda.stream(copier.stream):
        torch.cuda._sleep(50_000_000)
    sums = [copier.copy(tensor).sum() for tensor in tensors]
    assert [float(s) for s in sums] == [float(t.sum()) for t in tensors]
    stats = copier.stats()
    assert stats["waits"] > 0  # 40 MiB through a 4 MiB pool
    assert stats["pinned_bytes"] <= 4 * MIB


@needs_cuda
def test_pinned_memory_stays_bounded(copier):
    rng = random.Random(0)
    tensors = [_random(torch.float16, (rng.randint(1, 4096), 256), seed=i) for i in range(64)]
    copies = [copier.copy(tensor) for tensor in tensors]
    for tensor, copied in zip(tensors, copies, strict=True):
        assert torch.equal(copied.cpu(), tensor)
    stats = copier.stats()
    assert stats["pinned_bytes"] <= 4 * MIB
    assert stats["copies"] == 64
    assert stats["bytes"] == stats["staged_bytes"] == sum(t.numel() * 2 for t in tensors)


@needs_cuda
def test_no_empty_cache_and_no_device_synchronize(copier, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("called per tensor")

    monkeypatch.setattr(torch.cuda, "empty_cache", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    tensors = [_random(torch.float16, (512, 1024), seed=i) for i in range(16)]
    copies = [copier.copy(tensor) for tensor in tensors]
    monkeypatch.undo()
    for tensor, copied in zip(tensors, copies, strict=True):
        assert torch.equal(copied.cpu(), tensor)


@needs_cuda
def test_copies_from_several_threads(copier):
    errors: list[int] = []

    def work(seed: int) -> None:
        for i in range(20):
            tensor = _random(torch.float32, (300, 700), seed=seed * 100 + i)
            if not torch.equal(copier.copy(tensor).cpu(), tensor):
                errors.append(seed)

    _run_in_threads(work, 4)
    assert errors == []


@needs_cuda
def test_one_shared_copier_per_device():
    index = torch.cuda.current_device()
    shared = host_to_device(index)
    assert isinstance(shared, HostToDevice)
    assert shared.device == torch.device("cuda", index)
    for form in (f"cuda:{index}", torch.device("cuda", index), "cuda"):
        assert host_to_device(form) is shared
