"""A tensor-parallel artifact in a TVM Disco session (kiln.runtime.executor's contract).

One worker per GPU runs the artifact's one program on its own shard of the weights; the
program all-reduces through the session's collective backend (Kiln's NCCL one). This process
is the controller: every call goes to all workers in order, and worker 0 runs in this process.
Inputs are copied to worker 0 and broadcast. Every rank computes the same full logits (the
embedding and the LM head are replicated), so the sampling kernels run on every worker too and
results are read from worker 0.

Weights: rank r's copy of each tensor goes to worker r (one scatter from worker 0). An artifact
that is not sharded (N = 1) is broadcast instead; only tests run one so, over CPU threads.

The session is not thread-safe: one thread at a time calls into a runner (the engine's lock).

Closing: TVM shuts a session down (its workers exit) when its last handle is freed. An explicit
`shutdown()` would be sooner, but any handle freed after it (a `Logits` someone kept) writes
to a dead worker's pipe and aborts the process; so the runner drops every handle it holds and
this executor its own, and the session goes with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from kiln.runtime.artifact import Manifest, read_manifest
from kiln.runtime.device import device_arch
from kiln.runtime.errors import KilnError
from kiln.runtime.executor import Staging, read_params
from kiln.runtime.externs import load_externs

LOAD_EXTERNS = "kiln.disco.load_externs"


class DiscoExecutor:
    """The artifact's VM on every worker of `session`; `devices`: each worker's device (by
    default the artifact's device kind, index = worker)."""

    single_caller = True

    def __init__(self, manifest: Manifest, session: Any, devices: Sequence[Any] | None = None):
        self.session = session
        self.workers = int(session.num_workers)
        ranks = manifest.tensor_parallel
        if ranks > 1 and self.workers != ranks:
            raise KilnError(
                f"{manifest.root} is sharded over {ranks} GPUs, but the Disco session has "
                f"{self.workers} workers: give it a session of {ranks}"
            )
        self.devices = list(devices or [
            tvm.runtime.device(manifest.device, 0 if manifest.device == "cpu" else i)
            for i in range(self.workers)
        ])  # fmt: skip
        self.device = self.devices[0]
        self._load_externs(manifest)
        library = manifest.library_for(device_arch(self.device))
        self.vm = session.load_vm_module(str(library), None)  # each worker's own device
        self._tuple_getitem = session.get_global_func("vm.builtin.tuple_getitem")
        self._create_view = session.get_global_func("runtime.TVMTensorCreateView")
        # self.session, not the argument: a closure over the session would outlive close()
        self._staging = Staging(lambda nbytes: self.session.empty((nbytes,), "uint8"), self.view)

    def _load_externs(self, manifest: Manifest) -> None:
        # Here first: this process holds worker 0 (and every worker of a threaded session), and a
        # failure inside a worker would abort it without a word (docs/TVM.md, Disco).
        load_externs(manifest)
        if manifest.data["target"].get("externs"):
            # Worker processes: the same, now that it is known to work.
            self.session.import_python_module(__name__)
            self.session.get_global_func(LOAD_EXTERNS)(str(manifest.root))

    def function(self, name: str) -> Callable[..., Any]:
        return self.vm[name]

    def builtin(self, name: str) -> Callable[..., Any]:
        return self.session.get_global_func(name)

    def upload(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        staged = self._staging.view(array)  # kiln.runtime.executor.Staging says why
        self.session.copy_to_worker_0(tvm.runtime.tensor(array), staged)
        self.session.broadcast_from_worker0(staged, staged)
        return staged

    def item(self, value: Any, index: int) -> Any:
        return self._tuple_getitem(value, index)

    def view(self, tensor: Any, shape: Sequence[int], dtype: str) -> Any:
        return self._create_view(tensor, tvm_ffi.Shape(list(shape)), dtype, 0)

    def numpy(self, tensor: Any, shape: Sequence[int], dtype: str) -> np.ndarray:
        host = tvm.runtime.empty(tuple(shape), dtype)
        self.session.copy_from_worker_0(host, tensor)
        self.session.sync_worker_0()
        return host.numpy()

    def read(self, value: Any) -> Any:
        # Disco's only way to fetch a non-tensor result; worker 0 shares this process.
        return value.debug_get_from_remote(0)

    def load_params(self, manifest: Manifest) -> Any:
        drefs: list[Any] = [None] * len(manifest.params)
        for index, arrays in read_params(manifest):
            if len(arrays) == 1:
                drefs[index] = self.session.broadcast(arrays[0])
            else:  # (ranks, *shape): worker r takes row r
                drefs[index] = self.session.scatter(np.stack(arrays))
        return self.session.get_global_func("ffi.Array")(*drefs)

    def close(self) -> None:
        """Drop this executor's handles into the session (the runner has dropped its own): a
        session nobody else holds then shuts down."""
        self.vm = self._tuple_getitem = self._create_view = None
        self._staging.close()
        if self.session is not None:
            # Function handles the session caches on itself: a cycle that would keep it alive.
            for cached in ("_cache", "_import_python_module"):
                if hasattr(self.session, cached):
                    delattr(self.session, cached)
            self.session = None


@tvm_ffi.register_global_func(LOAD_EXTERNS)
def _load_externs_here(root: str) -> None:
    """Run by every worker: the artifact's externs, registered in the worker's process."""
    load_externs(read_manifest(root, verify=False))
