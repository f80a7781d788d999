"""The batch-1 decode step as one CUDA graph, captured once per page count and replayed.

Relax's CUDA graphs (RewriteCUDAGraph) capture the runs of kernels between two KV-cache calls, so
a Llama decode step is still a graph, a cache call, a graph, ... two to three launches and
hand-overs a layer. Captured whole, the step is one launch: on an H100, a Llama-2-7B q4f16
step measured 2.19 ms of GPU time replayed against ~2.55 ms as Relax's graphs run it
(bench/NOTES.md, eleventh session). `StepGraphs` captures `STEP_GRAPH_ENTRY` (the CUDA target's
copy of decode_1 without Relax's graphs, kiln.passes.step_graph_entry) by stream capture, and
for greedy runs also the argmax and a copy of the token into the next step's input, so a run
of greedy steps never leaves the device but to read each token.

What a graph bakes in, and so what it is keyed by (docs/TVM.md, "Capturing more"):
- The KV cache's page tables live in one device buffer, at offsets that move with the arrays'
  sizes, and the decode attention's split count follows the page count: a graph is exact for
  one page count of a sequence held in one block. A forked sequence (one that shares pages
  with a prefix-cache entry: the engine forks a running request only when another is about to
  start) spans several blocks, and its steps run as before (Runner._graph_pages); a sliding
  window frees pages, so Runner takes no graphs for such a model.
- The first step of a page count runs without capture and the second captures: the first grows
  the decode attention's scratch and the GEMVs' split counters (a capture cannot allocate and
  zero them), and fills the VM's memory pool, from which the captured step's intermediates come
  (they are scratch within a step; the step's outputs are held with its graph).

Everything runs in order: the graph launches on a blocking stream (cuStreamCreate with flags 0)
and TVM's other work, on the legacy default stream, waits for it, and it for that work.
"""

from __future__ import annotations

import ctypes
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import tvm
import tvm_ffi

STEP_GRAPH_ENTRY = "decode_1_graph"
MAX_GRAPHS = 512  # (page count, greedy) pairs kept, least recently used dropped first
_CAPTURE_RELAXED = 2  # CU_STREAM_CAPTURE_MODE_RELAXED


class CudaDriver:
    """The CUDA driver API calls a capture needs (libcuda, opened once)."""

    _lib: Any = None

    def __init__(self) -> None:
        if CudaDriver._lib is None:
            CudaDriver._lib = ctypes.CDLL("libcuda.so.1")
        self.lib = CudaDriver._lib

    def __call__(self, name: str, *args: Any) -> None:
        self.check(name, self.call(name, *args))

    def check(self, name: str, result: int) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise RuntimeError(f"{name}: {(text.value or b'').decode() or result}")

    def call(self, name: str, *args: Any) -> int:
        """The CUresult, unchecked."""
        fn = getattr(self.lib, name)
        fn.restype = ctypes.c_int
        return fn(*args)


class _Graph:
    """One captured step: the executable graph and the tensors it writes (held, so that the
    memory pool never hands them to anyone else)."""

    def __init__(self, driver: CudaDriver, exe: ctypes.c_void_p, outputs: tuple[Any, ...]):
        self.driver, self.exe, self.outputs = driver, exe, outputs

    def destroy(self) -> None:
        if self.exe:
            self.driver("cuGraphExecDestroy", self.exe)
            self.exe = None


class StepGraphs:
    """Batch-1 decode steps of `runner` (a kiln.runtime.runner.Runner on one CUDA GPU) through
    captured graphs. `step(pages, greedy)` runs the step the cache has begun and returns what it
    wrote: (the decode entry's result, the argmax (1,) int32 or None). The step's input token
    is `self.ids` (1, 1) int32: `set_token` writes it; a greedy step writes its argmax there.
    The tensors a graph writes are the same at every replay: read them before the next step.
    `driver` and `entry`: the CUDA driver and the entry point captured (tests give others)."""

    def __init__(self, runner: Any, driver: Any = None, entry: str = STEP_GRAPH_ENTRY):
        self._runner = runner
        self._entry = runner.executor.function(entry)
        self._decode_1 = runner._decode_1  # with Relax's graphs: the steps once capture is off
        self._sync_tables = tvm_ffi.get_global_func(
            "vm.builtin.attention_kv_cache_get_query_positions"
        )
        self.ids = tvm.runtime.empty((1, 1), "int32", runner.device)
        self._cu = driver or CudaDriver()
        device = ctypes.c_int()
        self._cu("cuDeviceGet", ctypes.byref(device), runner.device.index)
        self._context = ctypes.c_void_p()
        self._cu("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), device)
        self._cu("cuCtxSetCurrent", self._context)
        self._stream = ctypes.c_void_p()
        self._cu("cuStreamCreate", ctypes.byref(self._stream), 0)  # blocking: see the docstring
        self._graphs: OrderedDict[tuple[int, bool], _Graph] = OrderedDict()
        self._seen: set[tuple[int, bool]] = set()
        self.off: str | None = None  # why capture stopped, after a failure
        self.captures = 0

    def set_token(self, token: int) -> None:
        self.ids.copyfrom(np.array([[token]], dtype="int32"))

    def step(self, pages: int, greedy: bool) -> tuple[Any, Any]:
        runner = self._runner
        self._sync_tables(runner.kv.cache)  # the tables' copy runs now, never inside a capture
        key = (pages, greedy)
        graph = self._graphs.get(key)
        if graph is None and key in self._seen and self.off is None:
            graph = self._capture(key, greedy)
        self._seen.add(key)
        if graph is None:
            return self._issue(greedy, None, self._decode_1 if self.off else self._entry)
        self._graphs.move_to_end(key)
        self._cu("cuCtxSetCurrent", self._context)
        self._cu("cuGraphLaunch", graph.exe, self._stream)
        return graph.outputs

    def _issue(self, greedy: bool, stream: ctypes.c_void_p | None, entry: Any) -> tuple[Any, Any]:
        """The step's work by `entry`, on TVM's current stream; the token copy on `stream`."""
        runner = self._runner
        out = entry(self.ids, runner.kv.cache, runner.params)
        if not greedy:
            return out, None
        ex = runner.executor
        logits = ex.view(ex.item(out, 0), (1, runner.vocab_size), "float32")
        argmax = runner._greedy(logits)
        self._cu("cuCtxSetCurrent", self._context)
        self._cu(
            "cuMemcpyDtoDAsync_v2", ctypes.c_uint64(self.ids.data_ptr()),
            ctypes.c_uint64(argmax.data_ptr()), ctypes.c_size_t(4), stream,
        )  # fmt: skip
        return out, argmax

    def _capture(self, key: tuple[int, bool], greedy: bool) -> _Graph | None:
        cu = self._cu
        cu("cuCtxSetCurrent", self._context)
        captured, exe = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            with tvm_ffi.use_raw_stream(self._runner.device, self._stream.value):
                cu("cuStreamBeginCapture_v2", self._stream, _CAPTURE_RELAXED)
                try:
                    outputs = self._issue(greedy, self._stream, self._entry)
                finally:  # ends the capture also when the step failed inside it
                    ended = cu.call("cuStreamEndCapture", self._stream, ctypes.byref(captured))
            cu.check("cuStreamEndCapture", ended)
            cu("cuGraphInstantiateWithFlags", ctypes.byref(exe), captured, ctypes.c_ulonglong(0))
        except Exception as e:  # whatever failed, nothing captured ran
            # This step runs uncaptured, and so do the later ones.
            self.off = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"whole-step CUDA graphs are off: {self.off}", stacklevel=3)
            return None
        finally:
            if captured:
                cu.call("cuGraphDestroy", captured)
        self.captures += 1
        graph = self._graphs[key] = _Graph(cu, exe, outputs)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)[1].destroy()
        return graph
