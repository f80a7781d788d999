"""Where a batch-1 int4 GEMV's time goes: kiln.gemv.q4 over matrices of growing size (N rows at
K = 4096, then K columns at N = 4096), each timed in a CUDA graph as an artifact runs it, and a
straight line fitted through the K = 4096 points: time = fixed + bytes / rate. `rate` is the
kernel's steady state (compare it with the copy bandwidth printed first), `fixed` what every
launch costs whatever its size (the launch in the graph, the first loads' latency, the last
blocks' arithmetic and reduction). "cold" reads the weights from HBM (bench/gemv.py's weight
copies, together past the L2 cache), "hot" one copy, from L2. Variants are gemv.cu's
(kVariants; 0 is the default); every variant's output is checked against the first one's.

    python bench/gemv_sweep.py [--library kiln-gemv.so] [--variants 0] [--json OUT]

The library is `--library` (an artifact's kiln-gemv.so) or kiln.runtime.gemv's build.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from gemv import _weight_copies

ROWS = (1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768, 65536)  # at K = 4096
COLS = (1024, 2048, 8192, 11008, 16384)  # at N = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path)
    parser.add_argument("--variants", default="0")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = [int(v) for v in args.variants.split(",")]

    import tvm
    import tvm_ffi

    from kiln.runtime.benchmark import copy_bandwidth
    from kiln.runtime.device import open_device
    from kiln.runtime.gemv import load_gemv

    device = open_device("cuda")
    load_gemv(args.library)
    graph_time = tvm_ffi.get_global_func("kiln.gemv.q4_graph_time")
    tiled = tvm_ffi.get_global_func("kiln.gemv.q4_tiled")
    print(f"copy bandwidth {copy_bandwidth(device) / 1e12:.2f} TB/s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for n, k in [(n, 4096) for n in ROWS] + [(4096, k) for k in COLS]:
        nbytes = n * k // 2 + n * k // 32 * 2  # int4 codes and fp16 scales
        stored = [rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32),
                  (rng.random((n, k // 32)) * 0.01).astype(np.float16)]  # fmt: skip
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, k)).astype(np.float16), device)
        tensors = [x, *(tvm.runtime.tensor(a, device) for a in stored)]
        copies = _weight_copies(tensors, stored, device)
        qweights, scales = [c[1] for c in copies], [c[2] for c in copies]
        out = tvm.runtime.empty((1, 1, n), "float16", device)
        first = None
        for v in variants:
            tiled(v, x, qweights[0], scales[0], out)
            got = out.numpy().astype(np.float32)
            first = got if first is None else first
            error = float(np.abs(got - first).max() / np.abs(first).max())
            if error > 1e-2:
                raise SystemExit(f"variant {v} differs from variant {variants[0]} at {n} x {k}")
            cold = min(graph_time(v, False, x, qweights, scales, out, args.reps) for _ in "ab")
            hot = min(graph_time(v, False, x, qweights[:1], scales[:1], out, args.reps)
                      for _ in "ab")  # fmt: skip
            rows.append(dict(variant=v, rows=n, cols=k, mb=nbytes / 1e6, cold_us=cold, hot_us=hot))
            print(f"variant {v}  {n:6d} x {k:5d}  {nbytes / 1e6:7.2f} MB  cold {cold:6.2f} us "
                  f"({nbytes / cold / 1e6:.2f} TB/s)  hot {hot:6.2f} us "
                  f"({nbytes / hot / 1e6:.2f} TB/s)", flush=True)  # fmt: skip
    print("time = fixed + MB / rate, fitted over the K = 4096 rows:")
    for v in variants:
        for kind in ("cold", "hot"):
            points = [(r["mb"], r[f"{kind}_us"]) for r in rows
                      if r["variant"] == v and r["cols"] == 4096]  # fmt: skip
            slope, fixed = np.polyfit(*zip(*points, strict=True), 1)
            print(f"  variant {v} {kind}: fixed {fixed:.2f} us, rate {1 / slope:.2f} TB/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
