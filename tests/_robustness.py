"""Helpers shared by the robustness suites (tests/test_robustness_*.py)."""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


class ChildFailed(AssertionError):
    """A forked child raised, died of a signal, or ran past its deadline."""


def run_in_child(function: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
    """Runs ``function(*args)`` in a forked child and returns its (picklable) result.

    Anything that could take the test process down (a SIGBUS, an abort, a hang) happens in
    the child instead and comes back as a ``ChildFailed`` naming what went wrong. An
    exception raised by ``function`` is re-raised here as ``ChildFailed`` with its traceback.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        try:
            payload = pickle.dumps(("ok", function(*args)))
        except BaseException as error:  # noqa: BLE001 (everything goes back to the parent)
            detail = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            payload = pickle.dumps(("raised", detail))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    try:
        data = _read_until_eof(read_end, pid, time.monotonic() + timeout)
    finally:
        os.close(read_end)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ChildFailed(f"the child process died of {name}")
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise ChildFailed(f"the child raised {value}")
    return value


def _read_until_eof(fd: int, pid: int, deadline: float) -> bytes:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ChildFailed("the child process hung (killed at its deadline)")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN-safe, float8-safe): same dtype, shape and raw bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
