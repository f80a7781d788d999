"""The batched decode's int4 Linears of a model shape at 8 to 128 rows of x (one per sequence),
each way Kiln can run them: the GEMV (kiln.gemv.q4: a kernel per 8 rows, each reading the weight),
kiln.gemv.q4_gemm (one kernel per 64 rows, reading the weight once: on Hopper's warpgroup MMAs
where they run), its mma.sync kernel alone (kiln.gemv.q4_gemm_mma), and the weight dequantized
into fp16 then cuBLAS (kiln.gemv.q4_dequantize + kiln.cublas.matmul). Each is checked against
NumPy and timed with the weights out of L2 (calls rotate over 256 MiB of weight copies), next to
the memory roofline (the int4 weight, x and out over the measured copy bandwidth). The last
column says which one kiln.gemv.q4_batched, what an artifact's batched decode calls, runs.

    python tests/gpu/build_artifacts.py DIR --gemv-only     # here: the externs' libraries
    python bench/q4_batched.py DIR [--json OUT]             # on the GPU, runtime only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv import SHAPES

ROWS = (8, 16, 32, 64, 128)


def _seconds(fn, copies, device, reps: int = 200) -> float:
    """Seconds per call, the calls rotating over `copies` (argument lists)."""
    for c in copies:
        fn(*c)
    device.sync()
    start = time.perf_counter()
    for i in range(reps):
        fn(*copies[i % len(copies)])
    device.sync()
    return (time.perf_counter() - start) / reps


def _dequantize_then(dequantize, matmul):
    """x, qweight, scale, out, w -> the weight dequantized into w, then out = x @ w^T."""

    def fn(x, qweight, scale, out, w):
        dequantize(qweight, scale, w)
        matmul(x, w, out)

    return fn


def run(directory: Path, shape: str, json_out: Path | None) -> None:
    import tvm
    import tvm_ffi

    from kiln.runtime import cublas, gemv
    from kiln.runtime.benchmark import copy_bandwidth
    from kiln.runtime.device import open_device

    device = open_device("cuda")
    gemv.load_gemv(directory / gemv.ARTIFACT_FILE)
    cublas.load_cublas(directory / cublas.ARTIFACT_FILE)
    get = tvm_ffi.get_global_func
    q4, gemm, batched = get(gemv.Q4), get("kiln.gemv.q4_gemm"), get(gemv.Q4_BATCHED)
    gemm_mma, plan = get("kiln.gemv.q4_gemm_mma"), get("kiln.gemv.q4_gemm_plan")
    dequantize, matmul = get("kiln.gemv.q4_dequantize"), get("kiln.cublas.matmul")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; us a call, % of the memory roofline")
    print("q4_gemm on the warpgroup MMAs:", bool(get("kiln.gemv.q4_gemm_wgmma")(device.index)))
    rng = np.random.default_rng(0)
    rows_out = []
    for name, n, k in SHAPES[shape]:
        qweight = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        scale = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)
        weights = [(tvm.runtime.tensor(qweight, device), tvm.runtime.tensor(scale, device))]
        weights += [
            (tvm.runtime.tensor(qweight, device), tvm.runtime.tensor(scale, device))
            for _ in range(-(-(256 << 20) // (qweight.nbytes + scale.nbytes)) - 1)
        ]
        shifts = np.arange(8, dtype=np.uint32) * 4
        nibbles = ((qweight[..., None] >> shifts) & 0xF).reshape(n, k).astype(np.float32) - 8
        w = nibbles * np.repeat(scale.astype(np.float32), 32, axis=1)
        scratch = tvm.runtime.empty((n, k), "float16", device)
        for m in ROWS:
            x = rng.standard_normal((m, k)).astype(np.float16)
            want = x.astype(np.float32) @ w.T
            xd, out = tvm.runtime.tensor(x, device), tvm.runtime.empty((m, n), "float16", device)
            nbytes = qweight.nbytes + scale.nbytes + x.nbytes + m * n * 2
            row = dict(matrix=name, rows=n, cols=k, m=m)
            # each way: the function and its argument lists, one per weight copy
            with_scratch = [(xd, q, s, out, scratch) for q, s in weights]
            paths = {
                "gemv": (q4, [(xd, q, s, out) for q, s in weights]),
                "gemm": (gemm, with_scratch),
                "gemm_mma": (gemm_mma, with_scratch),
                "dequant+cublas": (_dequantize_then(dequantize, matmul), with_scratch),
            }
            for label, (fn, copies) in paths.items():
                fn(*copies[0])
                got = out.numpy().astype(np.float32)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                seconds = _seconds(fn, copies, device)
                row[label] = dict(us=seconds * 1e6, roofline=nbytes / bandwidth / seconds,
                                  tflops=2 * m * n * k / seconds / 1e12, error=err)  # fmt: skip
            row["q4_batched"] = 1e6 * _seconds(batched, paths["gemm"][1], device)
            row["wgmma_splits"] = int(plan(m, n, k, device.index))  # 0: the mma.sync kernel
            rows_out.append(row)
            cells = "  ".join(
                f"{label} {row[label]['us']:7.1f} ({100 * row[label]['roofline']:4.1f}%, "
                f"err {row[label]['error']:.0e})"
                for label in paths
            )
            print(f"{name:<8} {n:>5} x {k:<5} m={m:<4} {cells}  "
                  f"q4_batched {row['q4_batched']:7.1f}  "
                  f"wgmma splits {row['wgmma_splits']}")  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps({"bandwidth": bandwidth, "rows": rows_out}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run(args.dir, args.shape, args.json)


if __name__ == "__main__":
    main()
