"""Attention of a model shape: Kiln's kernels (kiln.attention.prefill_ragged, prefill_paged and
decode_paged, what CUDA artifacts with fp16/bf16 caches of head_dim 64 or 128 call) against
TVM's TIR kernels (batch_prefill_ragged_kv, batch_prefill_paged_kv and batch_decode_paged_kv,
what they ran before and what other caches still run), each checked against the other. Prefill
is timed in TFLOP/s next to the dense fp16 GEMM peak measured with torch in the same run, with
torch's SDPA (FlashAttention) as a reference point when torch has CUDA; decode in GB/s of K/V
read next to the copy bandwidth measured in the same run.

    python bench/attention.py build DIR [--shape llama2-7b] [--arch sm_90]   # here: nvcc, TVM
    python bench/attention.py run DIR [--json OUT]                           # on the GPU
    python bench/attention.py splits DIR [--json OUT]                        # on the GPU

`build` writes Kiln's extern (kiln-attention.so) and TVM's kernels for the shape's heads
(tvm-prefill.so, device code as a fatbin) into DIR; `run` needs only the TVM runtime.
Ragged cases (a chunk against its own keys, causal): one sequence of 512, 1024, 2048 and 4096
tokens, and 4 sequences of 512 in one call; FLOPs 4 n^2 / 2 * head_dim * heads per sequence
(Q.K^T and P.V, half the keys masked). Paged cases (a chunk against the keys already in the
cache's pages of 16, shuffled; not causal, as the cache calls it): 1024 new tokens after 1024
and 3072 of history (the second chunk of a 2048-token prompt, the fourth of a 4096-token one),
and 4 sequences of 256 after 1024 each; FLOPs 4 n h * head_dim * heads per sequence (n new
tokens, h history); SDPA runs on the history gathered into contiguous tensors beforehand.
Kiln's kernels run with the tile height they pick ("kiln") and with each fixed height
("kiln64", "kiln128"). Decode cases (one query per sequence against its history in pages):
batch 1 after 128, 256, 1024 and 4096 keys, batch 8 after 1024, batch 64 after 576 and 1024;
Kiln's kernel with the splits it picks ("kiln") and unsplit ("kiln1"), and as an artifact's
cache runs it ("kilnf": kiln.attention.split_rope and append_kv recorded first, so that the
kernel also rotates q and k and writes the new token's k and v; the new token's slot here is
none, and its output is checked against "kiln" run on the q it rotated), each kernel's GPU time
from torch's profiler (CUPTI) when torch has CUDA, so a launch's host time does not count.
`splits`: that call as the cache makes it ("kilnf") at each split count forced (SPLITS; 0: the
kernel's own choice) over SPLIT_CASES, what the split rule (attention.cu's AutoSplits) is tuned
against.
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
# Paged: (new tokens, tokens of history) of each sequence of one call
PAGED_CASES = [[(1024, 1024)], [(1024, 3072)], [(256, 1024)] * 4]
# Decode: (sequences, keys of history each)
DECODE_CASES = [(1, 128), (1, 256), (1, 1024), (1, 4096), (8, 1024), (64, 576), (64, 1024)]
SPLIT_CASES = [(1, 256), (1, 1024), (1, 4096), (8, 1024), (16, 1024), (32, 576), (64, 576),
               (64, 1024)]  # fmt: skip
SPLITS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
PAGE_SIZE = 16
TVM_LIBRARY = "tvm-prefill.so"


def tvm_kernel_name(dtype: str, h_q: int, h_kv: int, head_dim: int, kind: str = "ragged") -> str:
    return f"tvm_{kind}_{dtype}_{h_q}_{h_kv}_{head_dim}"


def build_tvm_kernels(path: Path, configs: list[tuple[str, int, int, int]], arch: str) -> None:
    """TVM's ragged and paged (not sliding-window) prefill kernels and its decode kernel, as
    TIRPagedKVCache makes them for CUDA, for each (dtype, h_q, h_kv, head_dim), into one
    library whose device code is a fatbin (no compiler at load)."""
    import tvm
    from tvm.relax.frontend.nn.llm import _decode_kernels, _prefill_kernels

    from kiln.targets import cuda

    target = cuda._make_target(arch)
    funcs = {}
    for dtype, h_q, h_kv, head_dim in configs:
        name = tvm_kernel_name(dtype, h_q, h_kv, head_dim)
        func = _prefill_kernels._attention_prefill_ragged(
            h_kv, h_q, head_dim, head_dim, dtype, {}, target
        )
        funcs[name] = func.with_attr("global_symbol", name)
        name = tvm_kernel_name(dtype, h_q, h_kv, head_dim, "paged")
        func = _prefill_kernels._attention_prefill(
            h_kv, h_q, head_dim, dtype, False, {}, target, page_size=PAGE_SIZE
        )
        funcs[name] = func.with_attr("global_symbol", name)
        name = tvm_kernel_name(dtype, h_q, h_kv, head_dim, "decode")
        func = _decode_kernels._attention_decode(
            h_kv, h_q, head_dim, dtype, False, {}, target, page_size=PAGE_SIZE
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
    library = tvm.runtime.load_module(str(out / TVM_LIBRARY))
    peak, torch = torch_gemm()
    print(f"{config['shape']}: {heads} query heads, {kv_heads} KV heads of {head_dim}, fp16")
    if peak:
        print(f"dense fp16 GEMM peak (torch.matmul 8192^3): {peak / 1e12:.0f} TFLOP/s")
    rng = np.random.default_rng(0)
    bench = Bench(device, peak, torch, heads, kv_heads, head_dim)

    print("ragged (a chunk against its own keys, causal):")
    tiled = tvm_ffi.get_global_func("kiln.attention.prefill_ragged_tiled")
    heights = (("kiln", 0), ("kiln64", 64), ("kiln128", 128))  # Kiln's tile heights (0: auto)
    ours = [(name, tiled, (rows,)) for name, rows in heights]
    tvm_kernel = library[tvm_kernel_name("float16", heads, kv_heads, head_dim)]
    ragged = []
    for lengths in CASES:
        total = sum(lengths)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype("int32")
        q = rng.standard_normal((total, heads, head_dim)).astype("float16")
        k = rng.standard_normal((total, kv_heads, head_dim)).astype("float16")
        v = rng.standard_normal((total, kv_heads, head_dim)).astype("float16")
        args = [tvm.runtime.tensor(a, device) for a in (q, indptr, k, v, indptr)]
        args += [tvm.runtime.tensor(np.zeros(total, "int32"), device),  # RoPE: unused
                 tvm.runtime.tensor(np.zeros(len(lengths), "int32"), device)]  # fmt: skip
        label = f"{len(lengths)} x {lengths[0]}" if len(lengths) > 1 else f"{total}"
        row = bench.case(f"{label:>9s} tokens", [*ours, ("tvm", tvm_kernel, ())], args, 1,
                         causal_flops(lengths, heads, head_dim))  # fmt: skip
        if torch is not None:
            bench.torch(row, q, k, v, lengths, lengths, causal=True)
        ragged.append({"lengths": lengths, **row})

    print(f"paged (a chunk against the keys already in pages of {PAGE_SIZE}, not causal):")
    tiled = tvm_ffi.get_global_func("kiln.attention.prefill_paged_tiled")
    ours = [(name, tiled, lead) for name, _, lead in ours]
    tvm_kernel = library[tvm_kernel_name("float16", heads, kv_heads, head_dim, "paged")]
    paged = []
    for case in PAGED_CASES:
        news, history = [n for n, _ in case], [h for _, h in case]
        q = rng.standard_normal((sum(news), heads, head_dim)).astype("float16")
        pages, page_indptr, page_values, last, k, v = random_pages(rng, history, kv_heads, head_dim)
        q_indptr = np.cumsum([0, *news]).astype("int32")
        host = (q, q_indptr, pages, page_indptr, page_values, last)
        args = [tvm.runtime.tensor(a, device) for a in host]
        args += [tvm.runtime.tensor(np.zeros(len(case), "int32"), device),  # RoPE: unused
                 tvm.runtime.tensor(np.zeros(len(q), "int32"), device)]  # fmt: skip
        flops = sum(4.0 * n * h * head_dim * heads for n, h in case)
        label = f"{len(case)} x {news[0]}" if len(case) > 1 else f"{news[0]}"
        row = bench.case(f"{label:>9s} after {history[0]:5d}", [*ours, ("tvm", tvm_kernel, ())],
                         args, 0, flops)  # fmt: skip
        if torch is not None:
            bench.torch(row, q, k, v, news, history, causal=False)
        paged.append({"new": news, "history": history, **row})
    decode = run_decode(device, library, rng, heads, kv_heads, head_dim, torch)
    if json_out:
        json_out.write_text(json.dumps({"peak_flops": peak, "config": config, "cases": ragged,
                                        "paged_cases": paged, "decode_cases": decode},
                                       indent=1))  # fmt: skip


def run_decode(device, library, rng, heads: int, kv_heads: int, head_dim: int, torch) -> list:
    """Each DECODE_CASES case through Kiln's decode kernel (auto splits, one split) and TVM's:
    us per call and GB/s of K/V read (% of the copy bandwidth of this run)."""
    import tvm
    import tvm_ffi

    from kiln.runtime.benchmark import copy_bandwidth

    bandwidth = copy_bandwidth(device)
    print(f"decode (one query per sequence against its pages of {PAGE_SIZE}); copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s:")  # fmt: skip
    get = tvm_ffi.get_global_func
    split = get("kiln.attention.decode_paged_split")
    split_rope, append_kv = get("kiln.attention.split_rope"), get("kiln.attention.append_kv")
    theirs = library[tvm_kernel_name("float16", heads, kv_heads, head_dim, "decode")]
    kernels = [("kiln", split, (0,)), ("kiln1", split, (1,)), ("tvm", theirs, ())]
    rows = []
    for batch, history in DECODE_CASES:
        q = rng.standard_normal((batch, heads, head_dim)).astype("float16")
        pages, page_indptr, page_values, last, _, _ = random_pages(
            rng, [history] * batch, kv_heads, head_dim
        )
        args = [tvm.runtime.tensor(a, device) for a in (q, pages, page_indptr, page_values, last)]
        args += [tvm.runtime.tensor(np.zeros(batch, "int32"), device)] * 2  # RoPE: unused
        nbytes = 2 * batch * history * kv_heads * head_dim * 2  # K and V, fp16
        row: dict = {"batch": batch, "history": history, "bytes": nbytes}
        outputs = {}
        line = f"{batch:3d} x {history:5d} keys |"
        for name, fn, lead in kernels:
            out = tvm.runtime.empty(q.shape, "float16", device)
            lse = tvm.runtime.empty(q.shape[:2], "float32", device)
            call = lambda: fn(*lead, *args, out, lse, 0, 1.0, 1e4, head_dim**-0.5)  # noqa: B023, E731
            row[name] = kv_rate(gpu_seconds(call, device, torch), nbytes, bandwidth)
            line += f" {name} {row[name]['us']:7.1f} us {row[name]['percent']:5.1f}% |"
            outputs[name] = out.numpy().astype("float32")
        # kilnf: a qkv row of each sequence's new token, its q rotated into a q of its own
        qkv = rng.standard_normal((batch, heads + 2 * kv_heads, head_dim)).astype("float16")
        fused_args = [tvm.runtime.empty(q.shape, "float16", device), *args[1:]]
        out = tvm.runtime.empty(q.shape, "float16", device)
        lse = tvm.runtime.empty(q.shape[:2], "float32", device)
        fused = fused_decode(device, (split_rope, append_kv, split), qkv, history, fused_args,
                             (out, lse), head_dim)  # fmt: skip
        row["kilnf"] = kv_rate(gpu_seconds(fused, device, torch), nbytes, bandwidth)
        line += f" kilnf {row['kilnf']['us']:7.1f} us {row['kilnf']['percent']:5.1f}% |"
        got = out.numpy().astype("float32")
        split(0, *fused_args, out, lse, 0, 1.0, 1e4, head_dim**-0.5)  # the rotated q, unfused
        row["kilnf"]["max_diff_vs_kiln"] = float(np.abs(got - out.numpy().astype("float32")).max())
        for name in ("kiln", "kiln1"):
            row[name]["max_diff_vs_tvm"] = float(np.abs(outputs[name] - outputs["tvm"]).max())
        diffs = ", ".join(f"{n} {row[n]['max_diff_vs_tvm']:.1e}" for n in ("kiln", "kiln1"))
        print(f"{line} max |O - O_tvm| {diffs}, |O_f - O| {row['kilnf']['max_diff_vs_kiln']:.1e}",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


def kv_rate(seconds: float, nbytes: int, bandwidth: float) -> dict:
    """A decode call's time and its K/V read rate, also as a % of the copy bandwidth."""
    return {"us": seconds * 1e6, "gbs": nbytes / seconds / 1e9,
            "percent": 100 * nbytes / seconds / bandwidth}  # fmt: skip


def sweep_splits(out: Path, json_out: Path | None) -> None:
    """SPLIT_CASES through the fused decode call at each of SPLITS: us per call."""
    import tvm
    import tvm_ffi

    from kiln.runtime.attention import ARTIFACT_FILE, load_attention
    from kiln.runtime.device import open_device

    device = open_device("cuda")
    load_attention(out / ARTIFACT_FILE)
    config = json.loads((out / "attention.json").read_text())
    heads, kv_heads, head_dim = config["heads"], config["kv_heads"], config["head_dim"]
    _, torch = torch_gemm(256)  # torch with CUDA, for the profiler (or None)
    get = tvm_ffi.get_global_func
    tiled = get("kiln.attention.decode_paged_tiled")
    kernels = (get("kiln.attention.split_rope"), get("kiln.attention.append_kv"), tiled)
    rng = np.random.default_rng(0)
    print(f"{config['shape']}: fused decode calls, us at each forced split count (0: own choice)")
    rows = []
    for batch, history in SPLIT_CASES:
        pages, page_indptr, page_values, last, _, _ = random_pages(
            rng, [history] * batch, kv_heads, head_dim
        )
        q = np.zeros((batch, heads, head_dim), "float16")  # the kernel rotates qkv's q into it
        args = [tvm.runtime.tensor(a, device) for a in (q, pages, page_indptr, page_values, last)]
        args += [tvm.runtime.tensor(np.zeros(batch, "int32"), device)] * 2  # RoPE: unused
        qkv = rng.standard_normal((batch, heads + 2 * kv_heads, head_dim)).astype("float16")
        outputs = (tvm.runtime.empty(q.shape, "float16", device),
                   tvm.runtime.empty(q.shape[:2], "float32", device))  # fmt: skip
        row = {"batch": batch, "history": history, "us": {}}
        for splits in SPLITS:
            call = fused_decode(device, kernels, qkv, history, args, outputs, head_dim,
                                lead=(0, splits))  # fmt: skip
            row["us"][splits] = gpu_seconds(call, device, torch, reps=30) * 1e6
        rows.append(row)
        cells = " ".join(f"{s}:{us:.1f}" for s, us in row["us"].items())
        print(f"{batch:3d} x {history:5d} keys | {cells}", flush=True)
    if json_out:
        json_out.write_text(json.dumps({"config": config, "splits": rows}, indent=1))


def fused_decode(device, kernels, qkv, position: int, args: list, outputs: tuple, head_dim: int,
                 lead: tuple = (0,)):  # fmt: skip
    """A decode call as an artifact's cache makes it: split_rope and append_kv (of no slot)
    recorded, then the decode kernel (kernels[2], with `lead` before its arguments: splits for
    decode_paged_split, heads and splits for decode_paged_tiled), which rotates q (into args[0])
    and k itself."""
    import tvm

    split_rope, append_kv, decode = kernels
    batch, kv_heads = qkv.shape[0], args[1].shape[2]
    rows = tvm.runtime.tensor(qkv, device)
    positions = tvm.runtime.tensor(np.full(batch, position, "int32"), device)
    no_slots = tvm.runtime.tensor(np.full(batch, -1, "int32"), device)
    new_k, new_v = (tvm.runtime.empty((batch, kv_heads, head_dim), "float16", device)
                    for _ in range(2))  # fmt: skip

    def call():
        split_rope(rows, positions, args[0], new_k, new_v, 1)
        append_kv(args[1], new_k, new_v, no_slots)
        decode(*lead, *args, *outputs, 0, 1.0, 1e4, head_dim**-0.5)

    return call


def gpu_seconds(call, device, torch, reps: int = 50) -> float:
    """GPU time per call: the kernels' own time from torch's profiler (CUPTI sees every
    library's kernels) when torch has CUDA; else back-to-back wall time."""
    if torch is None:
        return seconds_per_call(call, device.sync)
    from torch.profiler import ProfilerActivity, profile

    call()
    device.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        device.sync()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.device_time_total for e in kernels) / reps / 1e6


def random_pages(rng, history: list[int], kv_heads: int, head_dim: int):
    """Random keys and values of each history in shuffled pages: (pages, page_indptr,
    page_values, last_page_len, k, v), k and v the same keys gathered (total, kv_heads, d)."""
    counts = [-(-h // PAGE_SIZE) for h in history]
    page_values = rng.permutation(sum(counts)).astype("int32")
    pages = rng.standard_normal((sum(counts), 2, kv_heads, PAGE_SIZE, head_dim)).astype("float16")
    page_indptr = np.cumsum([0, *counts]).astype("int32")
    last = np.array([(h - 1) % PAGE_SIZE + 1 for h in history], "int32")
    k, v = [], []
    for b, h in enumerate(history):
        kv = pages[page_values[page_indptr[b] : page_indptr[b + 1]]]  # (n, 2, kv_heads, page, d)
        kv = kv.transpose(1, 0, 3, 2, 4).reshape(2, -1, kv_heads, head_dim)[:, :h]
        k.append(kv[0])
        v.append(kv[1])
    return pages, page_indptr, page_values, last, np.concatenate(k), np.concatenate(v)


class Bench:
    """Times the kernels of one case on the same inputs, checks them against TVM's, prints a
    line of each (in TFLOP/s and % of the GEMM peak) and returns their figures."""

    def __init__(self, device, peak, torch, heads: int, kv_heads: int, head_dim: int):
        self.device, self.peak, self.torch_module = device, peak, torch
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def case(self, label: str, kernels: list, args: list, causal: int, flops: float) -> dict:
        """kernels: (name, fn, leading arguments); fn(*lead, *args, output, lse, causal,
        rotary_mode=0, rope_scale, rope_theta, sm_scale)."""
        import tvm

        total_q = args[0].shape[0]
        row: dict = {"flops": flops}
        outputs = {}
        for name, fn, lead in kernels:
            out = tvm.runtime.empty((total_q, self.heads, self.head_dim), "float16", self.device)
            lse = tvm.runtime.empty((total_q, self.heads), "float32", self.device)
            call = lambda: fn(*lead, *args, out, lse, causal, 0, 1.0, 1e4, self.head_dim**-0.5)  # noqa: B023, E731
            sec = seconds_per_call(call, self.device.sync)
            row[name] = {"us": sec * 1e6, "tflops": flops / sec / 1e12}
            outputs[name] = out.numpy().astype("float32")
        for name in outputs:
            if name != "tvm":
                row[name]["max_diff_vs_tvm"] = float(np.abs(outputs[name] - outputs["tvm"]).max())
        self.print(label, row)
        print(f"{'':16s}max |O - O_tvm|: " + ", ".join(
            f"{n} {row[n]['max_diff_vs_tvm']:.1e}" for n in outputs if n != "tvm"
        ), flush=True)  # fmt: skip
        return row

    def print(self, label: str, row: dict) -> None:
        line = f"{label} |"
        for name in ("kiln", "kiln64", "kiln128", "tvm", "torch"):
            if row.get(name):
                r = row[name]
                pct = f" {100 * r['tflops'] * 1e12 / self.peak:5.1f}%" if self.peak else ""
                line += f" {name} {r['us']:9.1f} us {r['tflops']:6.1f} TFLOP/s{pct} |"
        print(line, flush=True)

    def torch(self, row: dict, q, k, v, q_lengths: list[int], kv_lengths: list[int],
              causal: bool) -> None:  # fmt: skip
        """torch's SDPA on the same sequences, (batch, heads, tokens, head_dim) (equal lengths
        only: one call), KV heads repeated for grouped queries; printed after the case's line."""
        torch = self.torch_module
        if len(set(q_lengths)) > 1 or len(set(kv_lengths)) > 1:
            return
        batch = len(q_lengths)

        def dev(x, n):
            x = torch.from_numpy(x).cuda().view(batch, n, x.shape[1], x.shape[2])
            x = x.transpose(1, 2).contiguous()
            return x.repeat_interleave(self.heads // x.shape[1], dim=1)

        qt, kt, vt = dev(q, q_lengths[0]), dev(k, kv_lengths[0]), dev(v, kv_lengths[0])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sec = seconds_per_call(lambda: sdpa(qt, kt, vt, is_causal=causal), torch.cuda.synchronize)
        row["torch"] = {"us": sec * 1e6, "tflops": row["flops"] / sec / 1e12}
        print(f"{'':16s}torch SDPA {row['torch']['us']:9.1f} us "
              f"{row['torch']['tflops']:6.1f} TFLOP/s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "run", "splits"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=["llama2-7b", "llama3-8b"], default="llama2-7b")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.action == "build":
        build(args.dir, args.shape, args.arch)
    elif args.action == "splits":
        sweep_splits(args.dir, args.json)
    else:
        run(args.dir, args.json)


if __name__ == "__main__":
    main()
