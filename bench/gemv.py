"""The batch-1 decode GEMVs of a model shape, one kernel at a time: dlight's GEMV schedule against
Kiln's (kiln.targets.gemv), each checked against NumPy and timed next to the memory roofline
(the kernel's bytes / the measured copy bandwidth).

    python bench/gemv.py build DIR [--shape llama2-7b] [--arch sm_90]   # here, with the compiler
    python bench/gemv.py run DIR [--json OUT]                           # on the GPU, runtime only
"""

from __future__ import annotations

import argparse
import json
import sys
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
        stored = []
        for shape, dtype in k["params"]:
            if dtype == "uint32":
                stored.append(rng.integers(0, 2**32, shape, dtype=np.uint32))
            else:
                scale = 0.02 if k["preset"] == "q0f16" else 0.002
                stored.append((rng.standard_normal(shape) * scale).astype(dtype))
        args = [tvm.runtime.tensor(a, device) for a in [x.reshape(1, 1, -1), *stored]]
        result = tvm.runtime.empty((1, 1, k["rows"]), "float16", device)
        fn = library[k["kernel"]]
        fn(*args, result)
        want = reference(k["preset"], x.astype(np.float32), stored, k["cols"])
        got = result.numpy().reshape(-1).astype(np.float32)
        error = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
        hot = min(library.time_evaluator(k["kernel"], device, number=100, repeat=5)(
            *args, result).results)  # fmt: skip
        cold = _cold_seconds(fn, args, stored, result, device)
        nbytes = x.nbytes + sum(s.nbytes for s in stored) + k["rows"] * 2
        row = dict(k, hot_us=hot * 1e6, cold_us=cold * 1e6, gbps=nbytes / cold / 1e9,
                   roofline=nbytes / bandwidth / cold, error=error)  # fmt: skip
        row.pop("params")
        results.append(row)
        print(f"{k['kernel']:<24} cold {cold * 1e6:7.1f} us {row['gbps']:6.0f} GB/s "
              f"{100 * row['roofline']:5.1f}% of roofline | hot {hot * 1e6:7.1f} us | "
              f"max rel err {error:.1e}")  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps({"bandwidth": bandwidth, "kernels": results}, indent=1))


def _cold_seconds(fn, args, stored, result, device, reps: int = 300) -> float:
    """Seconds per call with the weights not in the GPU's L2 cache (as in a decode step, which
    reads every layer's weights once): calls rotate over copies of the weights that together
    exceed the cache. Launches are asynchronous, so for kernels longer than a launch this is
    the kernel's time."""
    import time

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
