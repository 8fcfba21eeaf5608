"""Host-to-device copies of offloaded weights through recycled pinned staging buffers.

An offloaded module's weights are CPU tensors (views of memory-mapped files, or tensors in
RAM) that are copied to the GPU before each of its forwards. A plain ``tensor.to("cuda")``
from such pageable memory is synchronous: the driver copies the bytes through its own small
pinned bounce buffer, the CPU waits for the whole transfer, and the copy runs well below the
PCIe rate. Copies out of page-locked (pinned) memory are DMA transfers that run at the full
rate and asynchronously; but pinning is expensive (``cudaHostAlloc`` takes milliseconds per
call and the memory cannot be swapped), so it must be done once and reused, not per weight.

`HostToDevice` does that: it keeps a bounded pool of pinned staging buffers (`StagingPool`),
copies each tensor's bytes into a free buffer with a host memcpy, and starts the DMA on a
side stream. The caller's stream waits for the copy on the GPU only, so the CPU goes on to
stage the next weight while the previous one is in flight, and compute queued on the
caller's stream overlaps the transfers. A buffer is reused only once the DMA out of it has
completed (a CUDA event says so), and a tensor bigger than one buffer is staged in pieces.

Nothing here synchronizes the device or empties the CUDA cache: the only waits are for the
oldest staging buffer when the pool is full.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

# Pinned bytes one device's pool may hold: enough to stay a few weights ahead of the DMA.
DEFAULT_MAX_PINNED_BYTES = 512 * 2**20
# The largest staging buffer; bigger tensors are staged in pieces of this size, so the pool
# holds few distinct sizes and the host memcpy of a piece overlaps the DMA of the previous.
DEFAULT_MAX_BUFFER_BYTES = 32 * 2**20
# The smallest staging buffer (biases and norms share this size class).
MIN_BUFFER_BYTES = 64 * 2**10

# Tensors whose bytes are copied as they are; subclasses (bitsandbytes parameters...) have
# their own ``.to`` and are left to it.
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


class CompletionEvent(Protocol):
    """What the pool needs of an event: ``torch.cuda.Event`` has both."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class StagingPool:
    """A bounded pool of byte buffers, each reused only once the work reading it completed.

    Buffer sizes are powers of two between ``min_buffer_bytes`` and ``max_buffer_bytes``
    (the caching host allocator rounds pinned allocations to powers of two anyway). The
    buffers held never total more than ``max_bytes``: when no free buffer is big enough and
    a new one would not fit, the pool waits for the oldest buffer in flight (and, if nothing
    is in flight, drops free buffers of other sizes to make room). A dropped pinned buffer
    goes back to torch's caching host allocator, which keeps it for the next allocation of
    that size; with the repeating shapes of a model's layers, drops are rare.

    Args:
        allocate: returns a new 1-D ``torch.uint8`` tensor of the given number of bytes.
        max_bytes: the bound on the bytes of all buffers held, free or in flight.
        max_buffer_bytes: the largest buffer (clamped to ``max_bytes``); `acquire` refuses
            more.
        min_buffer_bytes: the smallest buffer.
    """

    def __init__(
        self,
        allocate: Callable[[int], torch.Tensor],
        max_bytes: int = DEFAULT_MAX_PINNED_BYTES,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        min_buffer_bytes: int = MIN_BUFFER_BYTES,
    ):
        if min(max_bytes, max_buffer_bytes, min_buffer_bytes) <= 0:
            raise ValueError("StagingPool sizes must be positive")
        self.allocate = allocate
        self.max_bytes = max_bytes
        self.max_buffer_bytes = min(max_buffer_bytes, max_bytes)
        self.min_buffer_bytes = min(min_buffer_bytes, self.max_buffer_bytes)
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}  # size -> buffers ready for reuse
        self._in_flight: deque[tuple[torch.Tensor, CompletionEvent]] = deque()  # oldest first
        self._held_bytes = 0  # bytes of all buffers, free or in flight
        self._waits = 0

    def buffer_size(self, nbytes: int) -> int:
        """The size of the buffer that stages ``nbytes`` bytes."""
        if nbytes > self.max_buffer_bytes:
            raise ValueError(f"{nbytes} bytes exceed the largest buffer ({self.max_buffer_bytes})")
        size = 1 << max(nbytes - 1, 0).bit_length()
        return min(max(size, self.min_buffer_bytes), self.max_buffer_bytes)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes that nothing reads; the caller owns it until
        it hands it back with `release`. May wait for the oldest buffer in flight."""
        size = self.buffer_size(nbytes)
        with self._lock:
            self._reclaim_completed()
            while True:
                buffer = self._take_free(size)
                if buffer is not None:
                    return buffer
                if self._held_bytes + size <= self.max_bytes:
                    buffer = self.allocate(size)
                    self._held_bytes += size
                    return buffer
                if self._in_flight:
                    self._wait_for_oldest()
                else:
                    self._drop_smallest_free()

    def release(self, buffer: torch.Tensor, event: CompletionEvent) -> None:
        """Hands ``buffer`` back; it is reused once ``event`` has completed."""
        with self._lock:
            self._in_flight.append((buffer, event))

    def stats(self) -> dict[str, int]:
        """``pinned_bytes``: bytes of all buffers held; ``waits``: times `acquire` waited."""
        with self._lock:
            return {"pinned_bytes": self._held_bytes, "waits": self._waits}

    # -- under the lock ---------------------------------------------------------------

    def _reclaim_completed(self) -> None:
        # Work on one stream completes in order: stop at the first event still pending.
        while self._in_flight and self._in_flight[0][1].query():
            self._make_free(self._in_flight.popleft()[0])

    def _wait_for_oldest(self) -> None:
        buffer, event = self._in_flight.popleft()
        event.synchronize()
        self._waits += 1
        self._make_free(buffer)

    def _make_free(self, buffer: torch.Tensor) -> None:
        self._free.setdefault(buffer.numel(), []).append(buffer)

    def _take_free(self, size: int) -> torch.Tensor | None:
        # The smallest free buffer that is big enough.
        sizes = [s for s, buffers in self._free.items() if buffers and s >= size]
        return self._free[min(sizes)].pop() if sizes else None

    def _drop_smallest_free(self) -> None:
        # Everything is free but nothing fits: give back room held by smaller sizes.
        smallest = min(s for s, buffers in self._free.items() if buffers)
        self._free[smallest].pop()
        self._held_bytes -= smallest


class HostToDevice:
    """Copies host tensors to one CUDA device through pinned staging buffers on a side stream.

    `copy` returns as soon as the transfer is queued: the returned tensor may be used right
    away on the caller's current stream (which waits for the copy on the GPU), and its memory
    is not recycled by the caching allocator before that stream is done with it. Safe to use
    from several threads. Use `host_to_device` to share one per device.

    Args:
        device: the CUDA device.
        max_pinned_bytes: the bound on the pinned staging memory.
        max_buffer_bytes: the largest staging buffer; bigger tensors go in pieces.
    """

    def __init__(
        self,
        device: torch.device | str | int,
        max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    ):
        cuda_device = _cuda_device(device)
        if cuda_device is None:
            raise ValueError(f"HostToDevice needs a CUDA device, not {device!r}")
        self.device = _resolve_index(cuda_device)
        self.stream = torch.cuda.Stream(self.device)
        self.pool = StagingPool(_allocate_pinned, max_pinned_bytes, max_buffer_bytes)
        self._lock = threading.Lock()  # guards the counters
        self._counts = {"copies": 0, "bytes": 0, "staged_bytes": 0, "fallbacks": 0}

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device, with the same dtype, shape, strides and values as
        ``tensor.to(device)`` (but a plain tensor, with no autograd history).

        A tensor already on this device is returned as is. A pinned CPU tensor is copied
        without staging, by a DMA that reads it after `copy` returns: do not modify it until
        the caller's stream has passed the copy. Tensors on other devices, subclasses
        (bitsandbytes parameters...), sparse and quantized tensors are left to ``.to``."""
        if tensor.device == self.device:
            return tensor
        if tensor.device.type != "cpu" or not _is_plain(tensor):
            self._count(fallbacks=1)
            return tensor.to(self.device)
        with torch.no_grad(), torch.cuda.stream(self.stream):
            # Allocated while the side stream is current, so the allocator orders its reuse
            # after the side stream's copy; `record_stream` below adds the caller's stream.
            destination = torch.empty_like(tensor, device=self.device)
            source = _laid_out_like(tensor, destination)
            if source.is_pinned():
                event = self._copy_pinned(source, destination)
            else:
                event = self._copy_staged(source, destination)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            destination.record_stream(current)
        self._count(copies=1, bytes=_nbytes(source))
        return destination

    def stats(self) -> dict[str, int]:
        """Counters since creation: ``copies`` and ``bytes`` copied here (fallbacks not
        counted), ``staged_bytes`` that went through staging buffers, ``fallbacks`` (tensors
        left to ``.to``), ``waits`` for a busy staging buffer, ``pinned_bytes`` held by the
        pool."""
        with self._lock:
            counts = dict(self._counts)
        return counts | self.pool.stats()

    # -- on the side stream -----------------------------------------------------------

    def _copy_pinned(self, source: torch.Tensor, destination: torch.Tensor):
        if source.numel() == 0:
            return None
        destination.copy_(source, non_blocking=True)
        return self.stream.record_event()

    def _copy_staged(self, source: torch.Tensor, destination: torch.Tensor):
        source_bytes, destination_bytes = _flat_bytes(source), _flat_bytes(destination)
        event = None
        for start in range(0, source_bytes.numel(), self.pool.max_buffer_bytes):
            piece = source_bytes[start : start + self.pool.max_buffer_bytes]
            buffer = self.pool.acquire(piece.numel())
            try:
                staging = buffer[: piece.numel()]
                staging.copy_(piece)  # host memcpy, while earlier pieces are in flight
                destination_bytes[start : start + piece.numel()].copy_(staging, non_blocking=True)
            finally:  # even after a failure, so the pool gets its buffer back
                event = self.stream.record_event()
                self.pool.release(buffer, event)
        self._count(staged_bytes=source_bytes.numel())
        return event

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value


_copiers: dict[torch.device, HostToDevice] = {}
_copiers_lock = threading.Lock()


def host_to_device(device) -> HostToDevice | None:
    """The `HostToDevice` shared by every user of ``device`` (created on first use), or None
    when ``device`` is not a CUDA device ("cpu", "meta", "mps", "disk"...) or CUDA is not
    available. ``device`` is any form accelerate accepts: an int (CUDA index), "cuda",
    "cuda:1", a ``torch.device``; "cuda" without an index means the current CUDA device."""
    cuda_device = _cuda_device(device)
    if cuda_device is None or not torch.cuda.is_available():
        return None
    cuda_device = _resolve_index(cuda_device)
    with _copiers_lock:
        copier = _copiers.get(cuda_device)
        if copier is None:
            copier = _copiers[cuda_device] = HostToDevice(cuda_device)
        return copier


def _cuda_device(device) -> torch.device | None:
    """``device`` as a CUDA ``torch.device`` (index None for a bare "cuda"), or None when it
    names something else. Needs no CUDA."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:  # "disk" and other names torch does not know
            return None
    if isinstance(device, torch.device) and device.type == "cuda":
        return device
    return None


def _resolve_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _allocate_pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _is_plain(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) in _PLAIN_TENSOR_TYPES
        and tensor.layout == torch.strided
        and not tensor.is_quantized
    )


def _laid_out_like(tensor: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a host copy of it, with the memory layout of ``destination`` (made by
    `torch.empty_like`: the same strides as ``tensor`` when its elements fill one block, as
    ``.to`` keeps them, else contiguous), so that the copy is one block of bytes."""
    if all(
        size == 1 or ours == theirs
        for size, ours, theirs in zip(
            tensor.shape, tensor.stride(), destination.stride(), strict=True
        )
    ):
        return tensor
    return torch.empty_strided(tensor.shape, destination.stride(), dtype=tensor.dtype).copy_(tensor)


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a dense tensor, as a 1-D ``uint8`` view of its memory block."""
    return tensor.as_strided((tensor.numel(),), (1,)).view(torch.uint8)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
