"""The batch-1 decode GEMVs of a model shape, one kernel at a time: dlight's GEMV schedule against
Kiln's (kiln.targets.gemv), and Kiln's CUDA GEMV externs (kiln.runtime.gemv: q4 on every matrix,
its default and each of its variants, and the gate/up matrix as one SwiGLU kernel, int4 (default
and variants) and fp16), each checked against NumPy and timed next to the memory roofline (the
kernel's bytes / the measured copy bandwidth). The int4 externs are also timed in a CUDA graph,
as an artifact runs them (a call from Python costs ~6 us, as long as the smaller kernels); the
last table gives, per matrix, the variant gemv.cu's DefaultVariant picks and the fastest one.

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
from functools import partial
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


def _measure(
    label, fn, args, stored, result, want, hot, nbytes, bandwidth, device, copies=None, graph=None
) -> dict:
    """Checks fn(*args, result) against `want`, times it with the weights out of L2, prints a
    line and returns its figures (`hot`: seconds per call with them in L2; `nbytes`: what the
    kernel must read and write; `copies`: _weight_copies's, made here if None; `graph`: a
    function of the copies to time with -> (cold, hot) seconds a kernel in a CUDA graph)."""
    fn(*args, result)
    got = result.numpy().reshape(-1).astype(np.float32)
    error = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
    copies = copies or _weight_copies(args, stored, device)
    cold = _cold_seconds(fn, copies, result, device)
    row = dict(hot_us=hot * 1e6, cold_us=cold * 1e6, gbps=nbytes / cold / 1e9,
               roofline=nbytes / bandwidth / cold, error=error)  # fmt: skip
    line = (f"{label:<30} cold {cold * 1e6:7.1f} us {row['gbps']:6.0f} GB/s "
            f"{100 * row['roofline']:5.1f}% of roofline | hot {hot * 1e6:7.1f} us")  # fmt: skip
    if graph is not None:
        graph_cold, graph_hot = graph(copies)
        row.update(graph_cold_us=graph_cold * 1e6, graph_hot_us=graph_hot * 1e6,
                   graph_roofline=nbytes / bandwidth / graph_cold)  # fmt: skip
        line += (
            f" | graph: cold {graph_cold * 1e6:6.1f} us "
            f"{100 * row['graph_roofline']:5.1f}%, hot {graph_hot * 1e6:6.1f} us"
        )
    print(f"{line} | max rel err {error:.1e}")
    return row


# kiln.gemv.q4's variants (gemv.cu's kVariants): 16 weight rows a block per tile, p: prefetching
VARIANTS = {1: "w16", 2: "w32", 3: "w16p", 4: "w32p"}


def _run_externs(path: Path, shape: str, rng, bandwidth: float, device) -> list[dict]:
    """Kiln's GEMV externs on the shape's matrices (x: one row): q4 on each, its default and
    each variant (kiln.gemv.q4_tiled), and the gate/up matrix as SwiGLU (its output, half the
    rows, is what the MLP's down projection reads): q4 (default and variants,
    kiln.gemv.q4_swiglu_tiled) and fp16. q4 is also timed in a CUDA graph (as an artifact runs
    it: no host time between kernels); the summary names the fastest variant per matrix there
    and the one the default picks (gemv.cu's DefaultVariant)."""
    import tvm
    import tvm_ffi

    from kiln.runtime.gemv import F16_SWIGLU, Q4, Q4_SWIGLU, load_gemv

    load_gemv(path)
    get = tvm_ffi.get_global_func
    q4, q4_swiglu, f16_swiglu = get(Q4), get(Q4_SWIGLU), get(F16_SWIGLU)
    tiled, swiglu_tiled = get("kiln.gemv.q4_tiled"), get("kiln.gemv.q4_swiglu_tiled")
    default_variant, graph_time = (
        get("kiln.gemv.q4_default_variant"),
        get("kiln.gemv.q4_graph_time"),
    )
    # Calls come from Python here (in an artifact, a CUDA graph replays them): a kernel timed near
    # the cost of a call on a tiny matrix is bound by the host, not by its own speed.
    tiny = [((1, 1, 32), "float16"), ((16, 4), "uint32"), ((16, 1), "float16")]
    tiny = [tvm.runtime.tensor(np.zeros(shape, dtype), device) for shape, dtype in tiny]
    floor = _hot_seconds(q4, tiny, tvm.runtime.empty((1, 1, 16), "float16", device), device)
    print(
        f"Kiln's GEMV externs (kiln.runtime.gemv); a call of q4 on 16 x 32 takes "
        f"{floor * 1e6:.1f} us from Python (the graph figures have no host time):"
    )
    results, summary = [], []
    for name, rows, cols in SHAPES[shape]:
        forms = [(False, q4, tiled)] + (
            [(True, q4_swiglu, swiglu_tiled)] if name == "gate_up" else []
        )
        for swiglu, default, by_variant in forms:
            form = f"{name}_swiglu" if swiglu else name
            pick = int(default_variant(rows // 2 if swiglu else rows, cols, swiglu))
            print(f"q4f16_{form} ({rows} x {cols}): the default runs {VARIANTS[pick]}")
            case = _extern_case(rng, "q4f16", rows, cols, swiglu, device)
            graph_us = {}
            for variant in (0, *VARIANTS):
                fn = default if variant == 0 else partial(by_variant, variant)

                def graph(copies, variant=variant, swiglu=swiglu, case=case):
                    x, result = case["args"][0], case["result"]
                    qweights, scales = [c[1] for c in copies], [c[2] for c in copies]
                    cold = graph_time(variant, swiglu, x, qweights, scales, result, 300)
                    hot = graph_time(variant, swiglu, x, qweights[:1], scales[:1], result, 300)
                    return cold * 1e-6, hot * 1e-6

                label = f"q4f16_{form}_{'default' if variant == 0 else VARIANTS[variant]}"
                row = _measure_extern(label, fn, case, bandwidth, device, graph)
                graph_us[variant] = row["graph_cold_us"]
                results.append(dict(row, variant=VARIANTS.get(variant, "default")))
            best = min(VARIANTS, key=graph_us.get)
            summary.append((f"q4f16_{form}", pick, best, graph_us))
        if name == "gate_up":
            case = _extern_case(rng, "q0f16", rows, cols, True, device)
            results.append(
                _measure_extern("q0f16_gate_up_swiglu", f16_swiglu, case, bandwidth, device)
            )
    print("In a CUDA graph, cold (us): the default's pick [*] and the fastest variant [+]")
    for form, pick, best, graph_us in summary:
        cells = [f"{VARIANTS[v]} {graph_us[v]:6.1f}{'*' if v == pick else ' '}"
                 f"{'+' if v == best else ' '}" for v in VARIANTS]  # fmt: skip
        print(f"  {form:<22} " + "  ".join(cells))
    return results


def _extern_case(rng, preset: str, rows: int, cols: int, swiglu: bool, device) -> dict:
    """Random x and weights of a (rows, cols) matrix on the device, their copies (to read them
    from HBM), the result and its float32 reference."""
    import tvm

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
    nbytes = x.nbytes + sum(s.nbytes for s in stored) + int(np.prod(result.shape)) * 2
    return dict(preset=preset, rows=rows, cols=cols, stored=stored, args=args, result=result,
                want=want, nbytes=nbytes, copies=_weight_copies(args, stored, device))  # fmt: skip


def _measure_extern(label, fn, case, bandwidth, device, graph=None) -> dict:
    args, result = case["args"], case["result"]
    hot = _hot_seconds(fn, args, result, device)
    row = _measure(label, fn, args, case["stored"], result, case["want"], hot, case["nbytes"],
                   bandwidth, device, case["copies"], graph)  # fmt: skip
    return dict(kernel=label, preset=case["preset"], matmul=label.split("_", 1)[1],
                rows=case["rows"], cols=case["cols"], schedule="extern", **row)  # fmt: skip


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


def _weight_copies(args, stored, device) -> list[list]:
    """args, then copies of it with the weights (args[1:]) copied, that together exceed the
    GPU's L2 cache: 256 MiB in all."""
    import tvm

    per_copy = sum(s.nbytes for s in stored)  # the weights (args[1:]), as on the host
    return [args] + [
        [args[0], *(tvm.runtime.tensor(s, device) for s in stored)]
        for _ in range(-(-(256 << 20) // per_copy) - 1)
    ]


def _cold_seconds(fn, copies, result, device, reps: int = 300) -> float:
    """Seconds per call with the weights not in the GPU's L2 cache (as in a decode step, which
    reads every layer's weights once): calls rotate over `copies` (_weight_copies). Launches are
    asynchronous, so for kernels longer than a launch from Python this is the kernel's time."""
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
