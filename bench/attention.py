"""Prefill attention of a model shape: Kiln's tensor-core kernel (kiln.attention.prefill_ragged,
what CUDA artifacts with fp16/bf16 caches of head_dim 64 or 128 call) against TVM's TIR kernel
(batch_prefill_ragged_kv, what they ran before and what other caches still run), each checked
against the other and timed in TFLOP/s next to the dense fp16 GEMM peak measured with torch in
the same run, with torch's SDPA (FlashAttention) as a reference point when torch has CUDA.

    python bench/attention.py build DIR [--shape llama2-7b] [--arch sm_90]   # here: nvcc, TVM
    python bench/attention.py run DIR [--json OUT]                           # on the GPU

`build` writes Kiln's extern (kiln-attention.so) and TVM's kernel for the shape's heads
(tvm-ragged-prefill.so, device code as a fatbin) into DIR; `run` needs only the TVM runtime.
Cases: one causal sequence of 512, 1024, 2048 and 4096 tokens, and 4 sequences of 512 in one
call. Kiln's kernel runs with the tile height it picks ("kiln") and with each fixed height
("kiln64", "kiln128"). FLOPs of causal attention: 4 n^2 / 2 * head_dim * heads per sequence
(Q.K^T and P.V, half the keys masked).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import seconds_per_call, torch_gemm
from shapes import SHAPES

CASES = [[512], [1024], [2048], [4096], [512] * 4]  # sequence lengths of one call
TVM_LIBRARY = "tvm-ragged-prefill.so"


def tvm_kernel_name(dtype: str, h_q: int, h_kv: int, head_dim: int) -> str:
    return f"tvm_ragged_{dtype}_{h_q}_{h_kv}_{head_dim}"


def build_tvm_kernels(path: Path, configs: list[tuple[str, int, int, int]], arch: str) -> None:
    """TVM's ragged prefill kernel, as TIRPagedKVCache makes it for CUDA, for each (dtype, h_q,
    h_kv, head_dim), into one library whose device code is a fatbin (no compiler at load)."""
    import tvm
    from tvm.relax.frontend.nn.llm import _prefill_kernels

    from kiln.targets import cuda

    target = cuda._make_target(arch)
    funcs = {}
    for dtype, h_q, h_kv, head_dim in configs:
        name = tvm_kernel_name(dtype, h_q, h_kv, head_dim)
        func = _prefill_kernels._attention_prefill_ragged(
            h_kv, h_q, head_dim, head_dim, dtype, {}, target
        )
        funcs[name] = func.with_attr("global_symbol", name)
    with target:
        executable = tvm.compile(tvm.IRModule(funcs), target=target)
    cuda.export_library(executable, str(path), arch)


def build(out: Path, shape: str, arch: str) -> None:
    from kiln.runtime import attention

    c = SHAPES[shape]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c["hidden_size"] // heads
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(attention.build([arch]), out / attention.ARTIFACT_FILE)
    build_tvm_kernels(out / TVM_LIBRARY, [("float16", heads, kv_heads, head_dim)], arch)
    config = {"shape": shape, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    (out / "attention.json").write_text(json.dumps(config, indent=1))
    print(f"Kiln's kernel and TVM's for {shape} ({heads}/{kv_heads} heads of {head_dim}) -> {out}")


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    return sum(4.0 * n * n / 2 * head_dim * heads for n in lengths)


def run(out: Path, json_out: Path | None) -> None:
    import tvm
    import tvm_ffi

    from kiln.runtime.attention import ARTIFACT_FILE, load_attention
    from kiln.runtime.device import open_device

    device = open_device("cuda")  # TVM's CUDA runtime before the extern (it shares libcudart)
    load_attention(out / ARTIFACT_FILE)
    config = json.loads((out / "attention.json").read_text())
    heads, kv_heads, head_dim = config["heads"], config["kv_heads"], config["head_dim"]
    tiled = tvm_ffi.get_global_func("kiln.attention.prefill_ragged_tiled")
    tvm_kernel = tvm.runtime.load_module(str(out / TVM_LIBRARY))[
        tvm_kernel_name("float16", heads, kv_heads, head_dim)
    ]
    peak, torch = torch_gemm()
    print(
        f"{config['shape']}: {heads} query heads, {kv_heads} KV heads of {head_dim}, fp16, causal"
    )
    if peak:
        print(f"dense fp16 GEMM peak (torch.matmul 8192^3): {peak / 1e12:.0f} TFLOP/s")
    rng = np.random.default_rng(0)
    results = []
    for lengths in CASES:
        total = sum(lengths)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype("int32")
        q = rng.standard_normal((total, heads, head_dim)).astype("float16")
        k = rng.standard_normal((total, kv_heads, head_dim)).astype("float16")
        v = rng.standard_normal((total, kv_heads, head_dim)).astype("float16")
        args = [tvm.runtime.tensor(a, device) for a in (q, indptr, k, v, indptr)]
        args += [tvm.runtime.tensor(np.zeros(total, "int32"), device),  # RoPE: unused
                 tvm.runtime.tensor(np.zeros(len(lengths), "int32"), device)]  # fmt: skip
        outputs = {}
        callers = {}
        for name, fn, lead in [("kiln", tiled, (0,)), ("kiln64", tiled, (64,)),
                               ("kiln128", tiled, (128,)), ("tvm", tvm_kernel, ())]:  # fmt: skip
            callers[name], outputs[name] = bind(fn, lead, args, (total, heads, head_dim), device)
        flops = causal_flops(lengths, heads, head_dim)
        label = f"{len(lengths)} x {lengths[0]}" if len(lengths) > 1 else f"{total}"
        row: dict = {"lengths": lengths, "flops": flops}
        for name, fn in callers.items():
            sec = seconds_per_call(fn, device.sync)
            row[name] = {"us": sec * 1e6, "tflops": flops / sec / 1e12}
        tvm_out = outputs["tvm"].numpy().astype("float32")
        for name in ("kiln", "kiln64", "kiln128"):
            row[name]["max_diff_vs_tvm"] = float(
                np.abs(outputs[name].numpy().astype("float32") - tvm_out).max()
            )
        if torch is not None:
            row["torch"] = measure_torch(torch, q, k, v, lengths, flops)
        results.append(row)
        line = f"{label:>9s} tokens |"
        for name in ("kiln", "kiln64", "kiln128", "tvm", "torch"):
            if row.get(name):
                r = row[name]
                pct = f" {100 * r['tflops'] * 1e12 / peak:5.1f}%" if peak else ""
                line += f" {name} {r['us']:9.1f} us {r['tflops']:6.1f} TFLOP/s{pct} |"
        print(line, flush=True)
        print(f"{'':16s}max |O - O_tvm|: " + ", ".join(
            f"{n} {row[n]['max_diff_vs_tvm']:.1e}" for n in ("kiln", "kiln64", "kiln128")
        ), flush=True)  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps({"peak_flops": peak, "config": config, "cases": results},
                                       indent=1))  # fmt: skip


def bind(fn, lead: tuple, args: list, shape: tuple[int, int, int], device):
    """fn(*lead, q, q_indptr, k, v, kv_indptr, rope..., output, lse, causal=1, rotary_mode=0,
    rope_scale, rope_theta, sm_scale) as a call without arguments, and its output tensor."""
    import tvm

    out = tvm.runtime.empty(shape, "float16", device)
    lse = tvm.runtime.empty(shape[:2], "float32", device)
    sm_scale = shape[2] ** -0.5
    return (lambda: fn(*lead, *args, out, lse, 1, 0, 1.0, 1e4, sm_scale)), out


def measure_torch(torch, q, k, v, lengths: list[int], flops: float) -> dict:
    """torch's SDPA (causal) on the same sequences, (batch, heads, tokens, head_dim); equal
    lengths only (one call), and KV heads repeated for grouped queries."""
    n, heads = lengths[0], q.shape[1]
    if any(length != n for length in lengths):
        return {}

    def dev(x):
        x = torch.from_numpy(x).cuda().view(len(lengths), n, x.shape[1], x.shape[2])
        x = x.transpose(1, 2).contiguous()
        return x.repeat_interleave(heads // x.shape[1], dim=1)

    qt, kt, vt = dev(q), dev(k), dev(v)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
    sec = seconds_per_call(fn, torch.cuda.synchronize)
    return {"us": sec * 1e6, "tflops": flops / sec / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=["llama2-7b", "llama3-8b"], default="llama2-7b")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.action == "build":
        build(args.dir, args.shape, args.arch)
    else:
        run(args.dir, args.json)


if __name__ == "__main__":
    main()
