"""A Disco collective backend for CPU threads, in Python: tests only (the product's is NCCL).

Disco's collectives (`runtime.disco.allreduce`, ...) call `runtime.disco.<ccl>.<name>`, where
<ccl> is the worker's backend name, which stays empty unless a C++ backend's init_ccl sets it.
So registering `runtime.disco..allreduce`, `..broadcast_from_worker0` and
`..scatter_from_worker0` here makes them work in a plain `ThreadedSession` on the CPU, without
init_ccl: Kiln's runner can then run a tensor-parallel CPU build, or broadcast an unsharded one
to several workers, with no GPU. The workers meet at a barrier; rank r's value is worker r's.

    with cpu_session(2) as sess:
        runner = Runner(artifact, session=sess)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import tvm_ffi

from kiln.runtime.disco import disco_module

# A worker blocked longer than this aborts the test process (an exception in a Disco worker
# thread cannot be reported), which beats hanging CI.
TIMEOUT_S = 120.0
# Disco's reduce kinds, in the order of its REDUCE_OPS
REDUCE = [np.add, np.multiply, np.minimum, np.maximum, np.add]


class _Meeting:
    """Where the n workers of one session swap values."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=TIMEOUT_S)
        self.values: list[Any] = [None] * n

    def exchange(self, value: Any) -> tuple[int, list[Any]]:
        """(this worker's rank, every worker's value) once all have given theirs."""
        rank = int(tvm_ffi.get_global_func("runtime.disco.worker_id")()[0])
        self.values[rank] = value
        self.barrier.wait()
        values = list(self.values)
        self.barrier.wait()  # nobody overwrites a value before everyone has read it
        return rank, values


_meeting: _Meeting | None = None


def _allreduce(send: Any, kind: int, _in_group: bool, recv: Any) -> None:
    assert _meeting is not None
    _, values = _meeting.exchange(send.numpy())
    out = functools.reduce(REDUCE[int(kind)], values)
    if int(kind) == 4:  # avg
        out = out / len(values)
    recv.copyfrom(np.ascontiguousarray(out.astype(values[0].dtype).reshape(recv.shape)))


def _broadcast_from_worker0(send: Any, _in_group: bool, recv: Any) -> None:
    assert _meeting is not None
    _, values = _meeting.exchange(send.numpy() if send is not None else None)
    recv.copyfrom(np.ascontiguousarray(values[0].reshape(recv.shape)))


def _scatter_from_worker0(send: Any, _in_group: bool, recv: Any) -> None:
    assert _meeting is not None
    rank, values = _meeting.exchange(send.numpy() if send is not None else None)
    part = values[0].reshape(_meeting.n, -1)[rank]  # worker r takes row r
    recv.copyfrom(np.ascontiguousarray(part.reshape(recv.shape)))


for _name, _fn in (
    ("allreduce", _allreduce),
    ("broadcast_from_worker0", _broadcast_from_worker0),
    ("scatter_from_worker0", _scatter_from_worker0),
):
    tvm_ffi.register_global_func(f"runtime.disco..{_name}", _fn, override=True)


def open_cpu_session(workers: int) -> Any:
    """A ThreadedSession of `workers` CPU threads whose collectives run here (the last one
    opened; shut it down before opening the next)."""
    global _meeting
    _meeting = _Meeting(workers)
    return disco_module().ThreadedSession(workers)


@contextlib.contextmanager
def cpu_session(workers: int) -> Iterator[Any]:
    """`open_cpu_session`, shut down at the end of the block."""
    session = open_cpu_session(workers)
    try:
        yield session
    finally:
        session.shutdown()
