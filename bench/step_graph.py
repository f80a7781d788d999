"""The whole batch-1 decode step as one CUDA graph, against the runner's own passes: an experiment
(bench/NOTES.md, eleventh session), not yet Kiln's decode.

    python bench/step_graph.py compile CHECKPOINT OUT [--quantization q4f16]
    python bench/step_graph.py run ARTIFACT {graph,plain,legacy} [--steps 256]

`compile` builds a CUDA artifact with Relax's CUDA graphs off (RewriteCUDAGraph would capture
parts of decode_1 itself, and a capture that launches another graph was not tried). `run` times
the runner's batch-1 greedy passes after a 128-token prompt, three rounds, and prints a hash of
the first 64 tokens (the three ways must agree):

- legacy: `Runner.decode_greedy` as Kiln runs it (TVM on the legacy default stream);
- plain: the same on a blocking stream of this script made TVM's current stream;
- graph: each pass (decode_1, the greedy argmax, a device copy of the token into the next pass's
  input) captured on that stream into one CUDA graph per page count of the sequence, and
  replayed for the later passes with that page count; it also prints the captures' cost and a
  replayed step's GPU time (the last graph back to back).

What a graph bakes in (the KV cache's page-table addresses move with the page count, the decode
attention's split count follows it) makes one graph per page count exact for this one unforked
sequence only; docs/TVM.md says what capture needs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
import time

import numpy as np

CAPTURE_RELAXED = 2  # CU_STREAM_CAPTURE_MODE_RELAXED
PROMPT = 128


def compile_without_graphs(checkpoint: str, out: str, quantization: str) -> None:
    import kiln
    from kiln import targets
    from kiln.targets import cuda

    spec = dataclasses.replace(cuda.CUDA, pass_config=(("relax.backend.use_cuda_graph", False),))
    targets.TARGETS["cuda"] = spec
    kiln.compile(checkpoint, target="cuda", quantization=quantization, output=out, arch="sm_90")


class Driver:
    """The CUDA driver API calls the capture needs (libcuda, loaded once)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def __call__(self, name: str, *args) -> None:
        fn = getattr(self.lib, name)
        fn.restype = ctypes.c_int
        if (result := fn(*args)) != 0:
            raise RuntimeError(f"{name} failed: CUresult {result}")


def run(artifact: str, mode: str, steps: int) -> None:
    import tvm
    import tvm_ffi

    from kiln.runtime.device import open_device
    from kiln.runtime.runner import Runner

    cu = Driver()
    dev = open_device("cuda")
    tvm.runtime.empty((1,), "int32", dev)  # the CUDA context, current on this thread
    stream = ctypes.c_void_p()
    # Blocking (flags 0): TVM's host copies run on the legacy default stream, which orders
    # with a blocking stream only (docs/TVM.md).
    cu("cuStreamCreate", ctypes.byref(stream), 0)
    if mode != "legacy":  # TVM's kernels, Kiln's externs and the KV cache's compute stream
        tvm_ffi.use_raw_stream(dev, stream.value).__enter__()
    runner = Runner(artifact, "cuda", max_batch_size=1, kv_tokens=4096)
    ex = runner.executor
    rng = np.random.default_rng(0)
    prompt = [1, *rng.integers(3, 32000, PROMPT - 1).tolist()]
    sync_page_tables = tvm_ffi.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")

    def start() -> int:
        runner.kv.add(0)
        return int(np.argmax(runner.prefill([0], [prompt])[0]))

    def plain(n: int) -> list[int]:
        tokens = [t[0] for t in runner.decode_greedy([0], [start()], n)]
        runner.kv.remove(0)
        return tokens

    def graph(n: int) -> list[int]:
        ids = ex.upload(np.array([[start()]], dtype="int32"))
        graphs: dict[int, tuple] = {}
        tokens, capture_seconds, length = [], 0.0, len(prompt)
        for _ in range(n):
            runner.kv.begin([0], [1])
            sync_page_tables(runner.kv.cache)  # the copy runs now, not inside the capture
            pages = -(-(length + 1) // runner.page_size)
            if pages not in graphs:
                began = time.perf_counter()
                cu("cuStreamBeginCapture_v2", stream, CAPTURE_RELAXED)
                out = runner._decode_1(ids, runner.kv.cache, runner.params)
                logits = ex.view(ex.item(out, 0), (1, runner.vocab_size), "float32")
                argmax = runner._greedy(logits)
                cu("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(ids.data_ptr()),
                   ctypes.c_uint64(argmax.data_ptr()), ctypes.c_size_t(4), stream)  # fmt: skip
                captured, exe = ctypes.c_void_p(), ctypes.c_void_p()
                cu("cuStreamEndCapture", stream, ctypes.byref(captured))
                no_flags = ctypes.c_ulonglong(0)
                cu("cuGraphInstantiateWithFlags", ctypes.byref(exe), captured, no_flags)
                graphs[pages] = (exe, out, argmax)  # out and argmax: the graph writes them
                capture_seconds += time.perf_counter() - began
            exe, _, argmax = graphs[pages]
            cu("cuGraphLaunch", exe, stream)
            runner.kv.end()
            tokens.append(int(argmax.numpy()[0]))
            length += 1
        cu("cuStreamSynchronize", stream)
        began = time.perf_counter()
        for _ in range(50):  # the last graph back to back (the K/V it writes is not used after)
            cu("cuGraphLaunch", exe, stream)
        cu("cuStreamSynchronize", stream)
        replay = (time.perf_counter() - began) / 50
        runner.kv.remove(0)
        print(f"  {len(graphs)} graphs, {capture_seconds * 1e3:.1f} ms capturing and "
              f"instantiating them; a replayed step {replay * 1e3:.3f} ms")  # fmt: skip
        return tokens

    if mode == "graph":
        plain(steps + 32)  # grows the decode attention's split scratch (a device sync) first
    fn = graph if mode == "graph" else plain
    fn(32)  # warm up
    for _ in range(3):
        began = time.perf_counter()
        tokens = fn(steps)
        rate = steps / (time.perf_counter() - began)
        print(f"{mode}: {rate:.1f} tok/s over {steps} steps, tokens {hash(tuple(tokens[:64]))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("compile")
    build.add_argument("checkpoint")
    build.add_argument("out")
    build.add_argument("--quantization", default="q4f16")
    timing = sub.add_parser("run")
    timing.add_argument("artifact")
    timing.add_argument("mode", choices=("graph", "plain", "legacy"))
    timing.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()
    if args.command == "compile":
        compile_without_graphs(args.checkpoint, args.out, args.quantization)
    else:
        run(args.artifact, args.mode, args.steps)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
