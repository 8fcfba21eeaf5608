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

Offloaded modules go through the device's `CopyWindow`: the read-ahead copies the next
modules' weights while the current one computes, and at most ``max_modules`` modules'
weights are on the GPU at once. The pinned staging buffers are given back when the last
offloading hook using the device is garbage-collected.

Nothing here synchronizes the device or empties the CUDA cache: the only waits are for the
oldest staging buffer when the pool is full, and for all of them when it is given back.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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

# Offloaded modules whose weights may be on the GPU at once (copied ahead or running): the
# running one and the next, whose copy overlaps the running one's compute.
DEFAULT_MODULES_IN_FLIGHT = 2

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
    is in flight, drops free buffers of other sizes to make room, or waits for another
    thread to release one when other threads hold them all). A dropped pinned buffer goes
    back to torch's caching host allocator, which keeps it for the next allocation of that
    size; with the repeating shapes of a model's layers, drops are rare.

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
        self._released = threading.Condition(self._lock)  # notified by `release`
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
                    self._drop_smallest_free_or_wait()

    def release(self, buffer: torch.Tensor, event: CompletionEvent) -> None:
        """Hands ``buffer`` back; it is reused once ``event`` has completed."""
        with self._lock:
            self._in_flight.append((buffer, event))
            self._released.notify_all()

    def clear(self) -> None:
        """Gives back every buffer not held by a caller, once the work reading it completed
        (waits for it). Buffers held now are kept and reused as usual."""
        with self._lock:
            while self._in_flight:
                self._wait_for_oldest()
            for size, buffers in self._free.items():
                self._held_bytes -= size * len(buffers)
            self._free.clear()

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

    def _drop_smallest_free_or_wait(self) -> None:
        # Nothing is in flight: give back room held by free buffers of smaller sizes; when
        # other threads hold every buffer, wait until one of them releases one.
        sizes = [s for s, buffers in self._free.items() if buffers]
        if not sizes:
            self._waits += 1
            self._released.wait()
            return
        smallest = min(sizes)
        self._free[smallest].pop()
        self._held_bytes -= smallest


class StreamCopier(Protocol):
    """What `CopyWindow` needs of a copier: `HostToDevice` has all of it."""

    def queue_copy(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def copies_wait_for_compute(self) -> None: ...

    def record_copies(self) -> CompletionEvent | None: ...

    def compute_waits_for(self, event: CompletionEvent | None) -> None: ...


@dataclass
class Copied:
    """One weight copied to the device, and the host pointer it was read from (what the
    tied-parameters map is keyed by)."""

    tensor: torch.Tensor
    source_pointer: int


# (name, reader) of each weight one module's forward needs copied
Reads = list[tuple[str, Callable[[], torch.Tensor]]]


@dataclass
class _ModuleCopies:
    tensors: dict[str, Copied]
    ready: CompletionEvent | None  # completes when every copy above is done


class CopyWindow:
    """The offloaded modules' weights on one GPU: at most ``max_modules`` modules copied
    ahead or running at a time, so the device memory they take stays bounded.

    The read-ahead `stage`s the modules about to run (the next one's copy overlaps the
    current one's compute); a module's forward `take`s its copies (copying now what was not
    staged) and `release`s them when it ends. Ordering on the device:

    - the compute stream waits for a module's copies (`take`);
    - before each module's copies, the copy stream waits for all compute queued so far
      (`copies_wait_for_compute`): that includes every forward already released, so a copy
      may reuse the memory of weights released before it. That is why the copies need no
      ``record_stream``: the caching allocator hands a released module's memory to the
      next copy at once, and the bound holds however far the host runs ahead.

    A module taken while the window is full first drops the oldest copies staged ahead
    (a misprediction); when the running modules alone fill it (modules nested deeper than
    ``max_modules``) it goes over the bound rather than wait for itself.
    """

    def __init__(self, copier: StreamCopier, max_modules: int = DEFAULT_MODULES_IN_FLIGHT):
        if max_modules < 1:
            raise ValueError(f"max_modules must be at least 1, not {max_modules}")
        self.copier = copier
        self.max_modules = max_modules
        self._lock = threading.Lock()
        self._staged: dict[int, _ModuleCopies] = {}  # owner key -> copies; oldest first
        self._running: list[int] = []  # owners taken and not released (forwards nest)
        self.peak_modules = 0  # the most modules staged or running at once

    def stage(self, owner: object, reads: Reads) -> bool:
        """Queues the copies of ``owner``'s weights ahead of its forward, unless they are
        staged or running already. False when the window is full (nothing queued)."""
        key = id(owner)
        with self._lock:
            if key in self._staged or key in self._running:
                return True
            if len(self._staged) + len(self._running) >= self.max_modules:
                return False
            try:
                self._staged[key] = self._copy_module(reads)
            except Exception:  # a failed read: the forward reads again and reports it
                return True
            self._note_peak()
        return True

    def take(self, owner: object, reads: Reads) -> dict[str, Copied]:
        """``owner``'s weights named in ``reads`` on the device, ready for the compute
        stream: its staged copies, and copies made now of any not staged. ``owner`` holds
        its place in the window until `release`."""
        key = id(owner)
        with self._lock:
            staged = self._staged.pop(key, None) or _ModuleCopies({}, None)
            missing = [(name, read) for name, read in reads if name not in staged.tensors]
            if missing:
                self._make_room()
                extra = self._copy_module(missing)
                staged = _ModuleCopies(staged.tensors | extra.tensors, extra.ready)
            self._running.append(key)
            self._note_peak()
        self.copier.compute_waits_for(staged.ready)
        return staged.tensors

    def release(self, owner: object) -> None:
        """``owner``'s forward is done with the copies `take` gave it."""
        key = id(owner)
        with self._lock:
            if key in self._running:
                del self._running[len(self._running) - 1 - self._running[::-1].index(key)]

    def forget(self, owner_key: int) -> None:
        """Drops what is staged for the owner with ``id`` ``owner_key`` (it is gone)."""
        with self._lock:
            self._staged.pop(owner_key, None)

    def modules_in_flight(self) -> int:
        with self._lock:
            return len(self._staged) + len(self._running)

    # -- under the lock ---------------------------------------------------------------

    def _copy_module(self, reads: Reads) -> _ModuleCopies:
        if not reads:
            return _ModuleCopies({}, None)
        self.copier.copies_wait_for_compute()
        tensors = {}
        for name, read in reads:
            value = read()
            tensors[name] = Copied(self.copier.queue_copy(value), value.data_ptr())
        return _ModuleCopies(tensors, self.copier.record_copies())

    def _make_room(self) -> None:
        while self._staged and len(self._staged) + len(self._running) >= self.max_modules:
            del self._staged[next(iter(self._staged))]

    def _note_peak(self) -> None:
        self.peak_modules = max(self.peak_modules, len(self._staged) + len(self._running))


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
        max_modules: offloaded modules whose weights may be on the device at once (`window`).
    """

    def __init__(
        self,
        device: torch.device | str | int,
        max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_modules: int = DEFAULT_MODULES_IN_FLIGHT,
    ):
        cuda_device = _cuda_device(device)
        if cuda_device is None:
            raise ValueError(f"HostToDevice needs a CUDA device, not {device!r}")
        self.device = _resolve_index(cuda_device)
        self.stream = torch.cuda.Stream(self.device)
        self.pool = StagingPool(_allocate_pinned, max_pinned_bytes, max_buffer_bytes)
        self._lock = threading.Lock()  # guards the counters
        self._counts = {"copies": 0, "bytes": 0, "staged_bytes": 0, "fallbacks": 0}
        self._users = 0
        self.window = CopyWindow(self, max_modules)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device, with the same dtype, shape, strides and values as
        ``tensor.to(device)`` (but a plain tensor, with no autograd history).

        A tensor already on this device is returned as is. A pinned CPU tensor is copied
        without staging, by a DMA that reads it after `copy` returns: do not modify it until
        the caller's stream has passed the copy. Tensors on other devices, subclasses
        (bitsandbytes parameters...), sparse and quantized tensors are left to ``.to``."""
        destination = self.queue_copy(tensor)
        if destination is not tensor and destination.device == self.device:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            destination.record_stream(current)
        return destination

    def queue_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`copy` without the caller's stream waiting for it or using its memory: the caller
        orders that (see `CopyWindow`)."""
        if tensor.device == self.device:
            return tensor
        if tensor.device.type != "cpu" or not _is_plain(tensor):
            self._count(fallbacks=1)
            return tensor.to(self.device)
        with torch.no_grad(), torch.cuda.stream(self.stream):
            # Allocated while the side stream is current, so the allocator orders its reuse
            # after the side stream's work.
            destination = torch.empty_like(tensor, device=self.device)
            source = _laid_out_like(tensor, destination)
            if source.is_pinned():
                if source.numel():
                    destination.copy_(source, non_blocking=True)
            else:
                self._copy_staged(source, destination)
        self._count(copies=1, bytes=_nbytes(source))
        return destination

    # -- the `StreamCopier` of this device's `CopyWindow` -------------------------------

    def copies_wait_for_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def record_copies(self) -> torch.cuda.Event:
        return self.stream.record_event()

    def compute_waits_for(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # -- users ------------------------------------------------------------------------

    def add_user(self, user: object) -> None:
        """Counts ``user`` (an offloading hook) among this device's users until it is
        garbage-collected; when the last one goes, what is staged for it and every pinned
        staging buffer not in use are given back."""
        with self._lock:
            self._users += 1
        weakref.finalize(user, self._user_gone, id(user))

    def _user_gone(self, user_key: int) -> None:
        self.window.forget(user_key)
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.pool.clear()

    def stats(self) -> dict[str, int]:
        """Counters since creation: ``copies`` and ``bytes`` copied here (fallbacks not
        counted), ``staged_bytes`` that went through staging buffers, ``fallbacks`` (tensors
        left to ``.to``), ``waits`` for a busy staging buffer, ``pinned_bytes`` held by the
        pool."""
        with self._lock:
            counts = dict(self._counts)
        return counts | self.pool.stats()

    # -- on the side stream -----------------------------------------------------------

    def _copy_staged(self, source: torch.Tensor, destination: torch.Tensor):
        source_bytes, destination_bytes = _flat_bytes(source), _flat_bytes(destination)
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

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value


_copiers: dict[torch.device, HostToDevice] = {}
_copiers_lock = threading.Lock()


def host_to_device(device, user: object | None = None) -> HostToDevice | None:
    """The `HostToDevice` shared by every user of ``device`` (created on first use), or None
    when ``device`` is not a CUDA device ("cpu", "meta", "mps", "disk"...) or CUDA is not
    available. ``device`` is any form accelerate accepts: an int (CUDA index), "cuda",
    "cuda:1", a ``torch.device``; "cuda" without an index means the current CUDA device.
    ``user`` (an offloading hook) is counted among the device's users (see `add_user`)."""
    cuda_device = _cuda_device(device)
    if cuda_device is None or not torch.cuda.is_available():
        return None
    cuda_device = _resolve_index(cuda_device)
    with _copiers_lock:
        copier = _copiers.get(cuda_device)
        if copier is None:
            copier = _copiers[cuda_device] = HostToDevice(cuda_device)
    if user is not None:
        copier.add_user(user)
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
