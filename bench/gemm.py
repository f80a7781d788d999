"""The prefill GEMMs of a model shape, one at a time: Kiln's cuBLAS extern (kiln.runtime.cublas,
what CUDA artifacts call) against dlight's Matmul kernel (what they ran before, and what other
targets still run), each checked against NumPy and timed in TFLOP/s next to the dense fp16 GEMM
peak measured with torch in the same run (when torch is there), and torch's own time for the
same shape.

    python bench/gemm.py build DIR [--shape llama2-7b] [--arch sm_90]   # here, with the compiler
    python bench/gemm.py run DIR [--tokens 512,2048] [--json OUT]       # on the GPU, runtime only

`build` compiles one dlight kernel per GEMM, with the token count symbolic as in an artifact's
prefill. `run` needs Kiln's cuBLAS extern in $KILN_CACHE (`python -m kiln.runtime.cublas` where
TVM's headers are, then copy the cache) and a cuBLAS (see kiln.runtime.cublas).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES


def gemms(shape: str) -> list[tuple[str, int, int]]:
    """(name, n, k) of each GEMM of one layer: out (tokens, n) = x (tokens, k) @ W (n, k)^T."""
    c = SHAPES[shape]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim
    return [("qkv", qkv, hidden), ("o", hidden, hidden), ("gate_up", 2 * inter, hidden),
            ("down", hidden, inter)]  # fmt: skip


def build(out: Path, shape: str, arch: str) -> None:
    import tvm
    from tvm.relax.frontend import nn
    from tvm.s_tir import dlight as dl

    from kiln.passes.fold_weight_transpose import FoldWeightTranspose
    from kiln.targets import cuda
    from kiln.targets.gpu import gpu_legalize

    class Proj(nn.Module):
        def __init__(self, n: int, k: int):
            self.proj = nn.Linear(k, n, False, "float16")

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.proj(x)

    target = cuda._make_target(arch)
    funcs, kernels = {}, []
    for name, n, k in gemms(shape):
        spec = {"forward": {"x": nn.spec.Tensor((1, "tokens", k), "float16")}}
        mod, _ = Proj(n, k).export_tvm(spec)
        with target:
            mod = tvm.transform.Sequential([FoldWeightTranspose(), *gpu_legalize(target)])(mod)
            (prim,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
            sch = dl.gpu.Matmul().apply(prim, target, False)
        if sch is None:
            raise SystemExit(f"dlight's Matmul declined the {name} GEMM")
        funcs[name] = sch.mod["main"].with_attr("global_symbol", name)
        kernels.append({"name": name, "n": n, "k": k})
    with target:
        executable = tvm.compile(tvm.IRModule(funcs), target=target)
    out.mkdir(parents=True, exist_ok=True)
    cuda.export_library(executable, str(out / "gemm.so"), arch)
    (out / "kernels.json").write_text(json.dumps({"shape": shape, "kernels": kernels}, indent=1))
    print(f"{len(kernels)} dlight kernels -> {out}")


def seconds_per_call(fn, sync, budget: float = 0.3) -> float:
    """Back-to-back calls (launches are asynchronous: for kernels longer than a launch this is
    the GPU's time), as many as fit in about `budget` seconds, after a warm-up."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    reps = max(3, min(1000, int(budget / max(time.perf_counter() - start, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def torch_gemm(n: int = 8192) -> tuple[float | None, object]:
    """The dense fp16 GEMM peak (FLOP/s, torch.matmul of n^3) and torch, or (None, None)."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, torch.cuda.synchronize), torch


def measure(fn, x, w, out, device, check: tuple[np.ndarray, np.ndarray], flops: float) -> dict:
    """fn(x, w, out) once against NumPy on the rows `check[0]` (whose product is `check[1]`),
    then timed."""
    rows, want = check
    out.copyfrom(np.full(tuple(out.shape), np.nan, np.float16))  # no earlier caller's result
    fn(x, w, out)
    got = out.numpy()[0, rows].astype(np.float32)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    sec = seconds_per_call(lambda: fn(x, w, out), device.sync)
    return {"us": sec * 1e6, "tflops": flops / sec / 1e12, "error": error}


def measure_torch(torch, x: np.ndarray, w: np.ndarray, flops: float) -> dict:
    xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    sec = seconds_per_call(lambda: torch.nn.functional.linear(xt, wt), torch.cuda.synchronize)
    return {"us": sec * 1e6, "tflops": flops / sec / 1e12}


def run(out: Path, tokens: list[int], json_out: Path | None) -> None:
    import tvm
    import tvm_ffi

    from kiln.runtime.cublas import cublas_library, load_cublas
    from kiln.runtime.device import open_device

    device = open_device("cuda")
    version = load_cublas()
    library = tvm.runtime.load_module(str(out / "gemm.so"))
    listing = json.loads((out / "kernels.json").read_text())
    peak, torch = torch_gemm()
    print(f"{listing['shape']}: cuBLASLt {version} ({cublas_library()})")
    if peak:
        print(f"dense fp16 GEMM peak (torch.matmul 8192^3): {peak / 1e12:.0f} TFLOP/s")
    rng = np.random.default_rng(0)
    results = []
    for kern in listing["kernels"]:
        name, n, k = kern["name"], kern["n"], kern["k"]
        w = (rng.standard_normal((n, k)) * k**-0.5).astype(np.float16)
        w_dev = tvm.runtime.tensor(w, device)
        callers = {"cublas": tvm_ffi.get_global_func("kiln.cublas.matmul"), "dlight": library[name]}
        for s in tokens:
            x = rng.standard_normal((1, s, k)).astype(np.float16)
            x_dev = tvm.runtime.tensor(x, device)
            result = tvm.runtime.empty((1, s, n), "float16", device)
            flops = 2.0 * s * n * k
            rows = rng.choice(s, min(s, 16), replace=False)
            check = (rows, x[0, rows].astype(np.float32) @ w.astype(np.float32).T)
            row: dict = {"gemm": name, "tokens": s, "n": n, "k": k}
            for caller, fn in callers.items():
                row[caller] = measure(fn, x_dev, w_dev, result, device, check, flops)
            if torch is not None:
                row["torch"] = measure_torch(torch, x, w, flops)
            results.append(row)
            line = f"{name:8s} {s:5d} x {n:5d} x {k:5d} |"
            for caller in ("cublas", "dlight", "torch"):
                if caller in row:
                    r = row[caller]
                    pct = f" {100 * r['tflops'] * 1e12 / peak:5.1f}%" if peak else ""
                    err = f" err {r['error']:.0e}" if "error" in r else ""
                    line += f" {caller} {r['us']:8.1f} us {r['tflops']:6.1f} TFLOP/s{pct}{err} |"
            print(line, flush=True)
    if json_out:
        json_out.write_text(json.dumps({"peak_flops": peak, "gemms": results}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=["llama2-7b", "llama3-8b"], default="llama2-7b")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--tokens", default="512,2048")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.action == "build":
        build(args.dir, args.shape, args.arch)
    else:
        run(args.dir, [int(t) for t in args.tokens.split(",")], args.json)


if __name__ == "__main__":
    main()
