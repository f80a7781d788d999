"""A mixture of experts' int4 MLP for a decode's few rows, each way Kiln can run it, on
Mixtral-8x7B's shape (8 experts of 4096 x 14336, top 2): kiln.gemv.q4_moe_swiglu + q4_moe (the
routed experts' weights only: what kiln.passes.dispatch_moe gives the batch-1 decode), the
GEMVs of the routed experts alone (q4_swiglu + q4 per routed expert: a perfect gather's
launches, without the weighted sum), and the dense mixture (q4_swiglu + q4 for every expert:
the graph without the pass). Calls rotate the routing over the experts so that each call reads
its weights from HBM; times are next to the memory roofline of the routed experts' bytes.

    python tests/gpu/build_artifacts.py DIR --gemv-only     # here: the externs' library
    python bench/moe.py DIR [--rows 1] [--json OUT]         # on the GPU, runtime only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from q4_batched import _seconds

EXPERTS, TOP, HIDDEN, INTER = 8, 2, 4096, 14336  # Mixtral-8x7B


def run(directory: Path, rows: int, reps: int, json_out: Path | None) -> None:
    import tvm
    import tvm_ffi

    from kiln.runtime import gemv
    from kiln.runtime.benchmark import copy_bandwidth
    from kiln.runtime.device import open_device

    device = open_device("cuda")
    gemv.load_gemv(directory / gemv.ARTIFACT_FILE)
    get = tvm_ffi.get_global_func
    swiglu, q4 = get(gemv.Q4_SWIGLU), get(gemv.Q4)
    moe_swiglu, moe = get(gemv.Q4_MOE_SWIGLU), get(gemv.Q4_MOE)
    bandwidth = copy_bandwidth(device)
    rng = np.random.default_rng(0)

    def on(a: np.ndarray):
        return tvm.runtime.tensor(a, device)

    def q4_weight(n: int, k: int) -> tuple:
        qweight = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        return on(qweight), on(rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16))

    gate_up = [q4_weight(2 * INTER, HIDDEN) for _ in range(EXPERTS)]
    down = [q4_weight(HIDDEN, INTER) for _ in range(EXPERTS)]
    expert_bytes = sum(t.numpy().nbytes for t in (*gate_up[0], *down[0]))
    x = on(rng.standard_normal((rows, HIDDEN)).astype(np.float16))
    # call i: row m takes experts TOP (i + m) .. + TOP - 1 (mod E): consecutive calls disjoint
    routings = []
    for i in range(EXPERTS):
        gate = np.zeros((rows, EXPERTS), np.float16)
        for m in range(rows):
            chosen = [(TOP * (i + m) + j) % EXPERTS for j in range(TOP)]
            gate[m, chosen] = rng.dirichlet(np.ones(TOP))
        routings.append((gate, sorted({e for e in range(EXPERTS) if gate[:, e].any()})))
    h = tvm.runtime.empty((EXPERTS, rows, INTER), "float16", device)
    out = tvm.runtime.empty((rows, HIDDEN), "float16", device)
    hs = [tvm.runtime.empty((rows, INTER), "float16", device) for _ in range(EXPERTS)]
    ys = [tvm.runtime.empty((rows, HIDDEN), "float16", device) for _ in range(EXPERTS)]
    flat_gate_up = [t for w in gate_up for t in w]
    flat_down = [t for w in down for t in w]

    def mixture(gate, _routed):
        moe_swiglu(x, gate, *flat_gate_up, h)
        moe(h, gate, *flat_down, out)

    def experts_of(which):
        def fn(_gate, routed):
            for e in which(routed):
                swiglu(x, *gate_up[e], hs[e])
                q4(hs[e], *down[e], ys[e])

        return fn

    calls = [(on(gate), routed) for gate, routed in routings]
    paths = {
        "q4_moe": mixture,
        "routed GEMVs": experts_of(lambda routed: routed),
        "dense": experts_of(lambda _routed: range(EXPERTS)),
    }
    # the mixture against the routed GEMVs' outputs, weighted (both on the GPU)
    mixture(*calls[0])
    experts_of(lambda routed: routed)(*calls[0])
    gate, routed = routings[0]
    want = sum(gate[:, e, None].astype(np.float64) * ys[e].numpy() for e in routed)
    err = float(np.abs(out.numpy() - want).max() / np.abs(want).max())
    routed_bytes = np.mean([len(r) for _, r in routings]) * expert_bytes
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; {rows} row(s) of x, {EXPERTS} experts, "
          f"top {TOP}; routed experts' bytes {routed_bytes / 1e6:.0f} MB a call "
          f"(roofline {routed_bytes / bandwidth * 1e6:.1f} us); q4_moe vs the routed GEMVs: "
          f"rel err {err:.1e}")  # fmt: skip
    results = {"bandwidth": bandwidth, "rows": rows, "routed_bytes": routed_bytes, "error": err}
    for label, fn in paths.items():
        seconds = _seconds(fn, calls, device, reps)
        results[label] = dict(us=seconds * 1e6, roofline=routed_bytes / bandwidth / seconds)
        print(f"{label:<14} {seconds * 1e6:8.1f} us  {100 * results[label]['roofline']:5.1f}%")
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run(args.dir, args.rows, args.reps, args.json)


if __name__ == "__main__":
    main()
