"""The batch-1 decode GEMVs of a model shape, one kernel at a time: dlight's GEMV schedule against
Kiln's (kiln.targets.gemv), and Kiln's CUDA GEMV externs (kiln.runtime.gemv: q4 on every matrix,
with 16 and 32 rows a block, and the gate/up matrix as one SwiGLU kernel, int4 and fp16), each
checked against NumPy and timed next to the memory roofline (the kernel's bytes / the measured
copy bandwidth).

    python bench/gemv.py build DIR [--shape llama2-7b] [--arch sm_90]   # here, with the compiler
    python bench/gemv.py run DIR [--json OUT]                           # on the GPU, runtime only

`build` also puts the externs' library (nvcc) in DIR; `run` times them when it is there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# (name, rows, cols) of every matmul a decode step runs, per model shape.
SHAPES = {
    "llama2-7b": [
        ("qkv", 12288, 4096),
        ("o", 4096, 4096),
        ("gate_up", 22016, 4096),
        ("down", 4096, 11008),
        ("lm_head", 32000, 4096),
    ],
    "llama3-8b": [
        ("qkv", 6144, 4096),
        ("o", 4096, 4096),
        ("gate_up", 28672, 4096),
        ("down", 4096, 14336),
        ("lm_head", 128256, 4096),
    ],
}
PRESETS = ("q0f16", "q4f16")


def _proj_module():
    from tvm.relax.frontend import nn

    class Proj(nn.Module):
        def __init__(self, proj: nn.Module):
            self.proj = proj

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            return self.proj(x)

    return Proj


def build(out: Path, shape: str, arch: str) -> None:
    import tvm
    from tvm.relax.frontend import nn
    from tvm.s_tir import dlight as dl

    from kiln.compiler.quantization import get_quantization
    from kiln.passes.fold_weight_transpose import FoldWeightTranspose
    from kiln.targets import cuda
    from kiln.targets.gemv import DecodeGEMV
    from kiln.targets.gpu import gpu_legalize

    _Proj = _proj_module()
    target = cuda._make_target(arch)
    rules = {"dlight": dl.gpu.GEMV(), "kiln": DecodeGEMV()}
    funcs, kernels = {}, []
    for preset in PRESETS:
        quantization = get_quantization(preset)
        for name, rows, cols in SHAPES[shape]:
            linear = _Proj(nn.Linear(cols, rows, False, "float16"))
            quantization.quantize_model(linear)  # swaps the children of a module
            spec = {"forward": {"x": nn.spec.Tensor((1, 1, cols), "float16")}}
            mod, params = linear.export_tvm(spec)
            with target:
                mod = tvm.transform.Sequential([FoldWeightTranspose(), *gpu_legalize(target)])(mod)
            (prim,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
            for schedule, rule in rules.items():
                kernel = f"{preset}_{name}_{schedule}"
                with target:
                    sch = rule.apply(prim, target, False)
                if sch is None:
                    print(f"{kernel}: declined by {schedule}", file=sys.stderr)
                    continue
                funcs[kernel] = sch.mod["main"].with_attr("global_symbol", kernel)
                args = [[list(map(int, p[1].shape)), p[1].dtype] for p in params]
                kernels.append(
                    dict(
                        kernel=kernel,
                        preset=preset,
                        matmul=name,
                        rows=rows,
                        cols=cols,
                        schedule=schedule,
                        params=args,
                    )
                )
    with target:
        executable = tvm.compile(tvm.IRModule(funcs), target=target)
    out.mkdir(parents=True, exist_ok=True)
    cuda.export_library(executable, str(out / "gemv.so"), arch)
    (out / "kernels.json").write_text(json.dumps({"shape": shape, "kernels": kernels}, indent=1))
    print(f"{len(kernels)} kernels -> {out}")
    from kiln.runtime import gemv

    shutil.copyfile(gemv.build([arch]), out / gemv.ARTIFACT_FILE)
    print(f"Kiln's GEMV externs -> {out / gemv.ARTIFACT_FILE}")


def reference(preset: str, x: np.ndarray, stored: list[np.ndarray], cols: int) -> np.ndarray:
    """x (cols,) float32 -> x @ W.T with W dequantized as the presets define it."""
    if preset == "q0f16":
        w = stored[0].astype(np.float32)
    else:  # q4f16: 8 nibbles per uint32 (low first), value - 8, one fp16 scale per 32 columns
        qweight, scale = stored
        shifts = np.arange(8, dtype=np.uint32) * 4
        q = ((qweight[..., None] >> shifts) & 0xF).reshape(qweight.shape[0], -1)[:, :cols]
        w = (q.astype(np.float16) - np.float16(8)) * np.repeat(scale, 32, axis=1)[:, :cols]
        w = w.astype(np.float32)
    return w @ x


def run(out: Path, json_out: Path | None) -> None:
    import tvm

    from kiln.runtime.benchmark import copy_bandwidth
    from kiln.runtime.device import open_device

    device = open_device("cuda")
    library = tvm.runtime.load_module(str(out / "gemv.so"))
    listing = json.loads((out / "kernels.json").read_text())
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s ({listing['shape']})")
    rng = np.random.default_rng(0)
    results = []
    for k in listing["kernels"]:
        x = rng.standard_normal(k["cols"]).astype(np.float16)
        stored = _random_weights(rng, k["preset"], k["params"])
        args = [tvm.runtime.tensor(a, device) for a in [x.reshape(1, 1, -1), *stored]]
        result = tvm.runtime.empty((1, 1, k["rows"]), "float16", device)
        want = reference(k["preset"], x.astype(np.float32), stored, k["cols"])
        hot = min(library.time_evaluator(k["kernel"], device, number=100, repeat=5)(
            *args, result).results)  # fmt: skip
        nbytes = x.nbytes + sum(s.nbytes for s in stored) + k["rows"] * 2
        row = _measure(k["kernel"], library[k["kernel"]], args, stored, result, want, hot,
                       nbytes, bandwidth, device)  # fmt: skip
        results.append({**{n: v for n, v in k.items() if n != "params"}, **row})
    if (out / "kiln-gemv.so").is_file():
        results += _run_externs(out / "kiln-gemv.so", listing["shape"], rng, bandwidth, device)
    if json_out:
        json_out.write_text(json.dumps({"bandwidth": bandwidth, "kernels": results}, indent=1))


def _random_weights(rng, preset: str, params: list) -> list[np.ndarray]:
    """Random stored weights of each (shape, dtype): packed words, or float16 values."""
    stored = []
    for shape, dtype in params:
        if dtype == "uint32":
            stored.append(rng.integers(0, 2**32, shape, dtype=np.uint32))
        else:
            scale = 0.02 if preset == "q0f16" else 0.002
            stored.append((rng.standard_normal(shape) * scale).astype(dtype))
    return stored


def _measure(label, fn, args, stored, result, want, hot, nbytes, bandwidth, device) -> dict:
    """Checks fn(*args, result) against `want`, times it with the weights out of L2, prints a
    line and returns its figures (`hot`: seconds per call with them in L2; `nbytes`: what the
    kernel must read and write)."""
    fn(*args, result)
    got = result.numpy().reshape(-1).astype(np.float32)
    error = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
    cold = _cold_seconds(fn, args, stored, result, device)
    row = dict(hot_us=hot * 1e6, cold_us=cold * 1e6, gbps=nbytes / cold / 1e9,
               roofline=nbytes / bandwidth / cold, error=error)  # fmt: skip
    print(f"{label:<24} cold {cold * 1e6:7.1f} us {row['gbps']:6.0f} GB/s "
          f"{100 * row['roofline']:5.1f}% of roofline | hot {hot * 1e6:7.1f} us | "
          f"max rel err {error:.1e}")  # fmt: skip
    return row


def _run_externs(path: Path, shape: str, rng, bandwidth: float, device) -> list[dict]:
    """Kiln's GEMV externs on the shape's matrices (x: one row): q4 (its default: 16 rows a
    block) and q4_tiled(2) (32 rows a block) on each, and the gate/up matrix as SwiGLU (its
    output, half the rows, is what the MLP's down projection reads), q4 and fp16."""
    import tvm
    import tvm_ffi

    from kiln.runtime.gemv import F16_SWIGLU, Q4, Q4_SWIGLU, load_gemv

    load_gemv(path)
    q4, tiled = tvm_ffi.get_global_func(Q4), tvm_ffi.get_global_func("kiln.gemv.q4_tiled")
    q4_swiglu, f16_swiglu = map(tvm_ffi.get_global_func, (Q4_SWIGLU, F16_SWIGLU))
    q4_32 = lambda *a: tiled(2, *a)  # noqa: E731
    cases = []  # (label, preset, fn, rows, cols, SwiGLU)
    for name, rows, cols in SHAPES[shape]:
        cases += [(f"q4f16_{name}_ext16", "q4f16", q4, rows, cols, False),
                  (f"q4f16_{name}_ext32", "q4f16", q4_32, rows, cols, False)]  # fmt: skip
        if name == "gate_up":
            cases += [("q4f16_gate_up_swiglu", "q4f16", q4_swiglu, rows, cols, True),
                      ("q0f16_gate_up_swiglu", "q0f16", f16_swiglu, rows, cols, True)]  # fmt: skip
    # Calls come from Python here (in an artifact, a CUDA graph replays them): a kernel timed near
    # the cost of a call on a tiny matrix is bound by the host, not by its own speed.
    tiny = [((1, 1, 32), "float16"), ((16, 4), "uint32"), ((16, 1), "float16")]
    tiny = [tvm.runtime.tensor(np.zeros(shape, dtype), device) for shape, dtype in tiny]
    floor = _hot_seconds(q4, tiny, tvm.runtime.empty((1, 1, 16), "float16", device), device)
    print(
        f"Kiln's GEMV externs (kiln.runtime.gemv); a call of q4 on 16 x 32 takes "
        f"{floor * 1e6:.1f} us from Python:"
    )
    results = []
    for label, preset, fn, rows, cols, swiglu in cases:
        params = [[[rows, cols], "float16"]]
        if preset == "q4f16":
            params = [[[rows, cols // 8], "uint32"], [[rows, cols // 32], "float16"]]
        x = rng.standard_normal(cols).astype(np.float16)
        stored = _random_weights(rng, preset, params)
        args = [tvm.runtime.tensor(a, device) for a in [x.reshape(1, 1, -1), *stored]]
        result = tvm.runtime.empty((1, 1, rows // 2 if swiglu else rows), "float16", device)
        want = reference(preset, x.astype(np.float32), stored, cols)
        if swiglu:
            gate, up = np.split(want, 2)
            want = gate / (1 + np.exp(-gate)) * up
        hot = _hot_seconds(fn, args, result, device)
        nbytes = x.nbytes + sum(s.nbytes for s in stored) + int(np.prod(result.shape)) * 2
        row = _measure(label, fn, args, stored, result, want, hot, nbytes, bandwidth, device)
        results.append(dict(kernel=label, preset=preset, matmul=label.split("_", 1)[1],
                            rows=rows, cols=cols, schedule="extern", **row))  # fmt: skip
    return results


def _hot_seconds(fn, args, result, device, number: int = 100, repeat: int = 5) -> float:
    """Seconds per call, the weights in L2: the best of `repeat` runs of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        fn(*args, result)
        device.sync()
        start = time.perf_counter()
        for _ in range(number):
            fn(*args, result)
        device.sync()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def _cold_seconds(fn, args, stored, result, device, reps: int = 300) -> float:
    """Seconds per call with the weights not in the GPU's L2 cache (as in a decode step, which
    reads every layer's weights once): calls rotate over copies of the weights that together
    exceed the cache. Launches are asynchronous, so for kernels longer than a launch this is
    the kernel's time."""
    import tvm

    per_copy = sum(s.nbytes for s in stored)  # the weights (args[1:]), as on the host
    copies = [args] + [
        [args[0], *(tvm.runtime.tensor(s, device) for s in stored)]
        for _ in range(-(-(256 << 20) // per_copy) - 1)
    ]
    for c in copies:
        fn(*c, result)
    device.sync()
    start = time.perf_counter()
    for i in range(reps):
        fn(*copies[i % len(copies)], result)
    device.sync()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.action == "build":
        build(args.dir, args.shape, args.arch)
    else:
        run(args.dir, args.json)


if __name__ == "__main__":
    main()
