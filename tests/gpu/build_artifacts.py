"""Build what the GPU tests load, on a machine with the compiler (the GPU machine may have only
the TVM runtime): tiny checkpoints and their CUDA artifacts, Kiln's prefill attention externs
with TVM's ragged and paged prefill kernels for the same shapes (tests/gpu/test_attention.py),
and Kiln's decode GEMV externs (tests/gpu/test_gemv_kernels.py), and the greedy sampler alone for
vocabularies it argmaxes in chunks (tests/gpu/test_cuda.py).

    python tests/gpu/build_artifacts.py OUT_DIR [--arch sm_90] [--tensor-parallel-only]
                                                [--attention-only] [--gemv-only]
                                                [--sampling-only]
    KILN_GPU_ARTIFACTS=OUT_DIR pytest -m gpu tests/gpu      # on the GPU machine
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import CHECKPOINTS, make_checkpoint

import kiln

# (family, preset) pairs the GPU tests run
BUILDS = (
    [(name, "q0f16") for name in CHECKPOINTS]
    + [(name, "q4f16") for name in CHECKPOINTS]
    + [(name, "fp8e4m3") for name in CHECKPOINTS]
    + [("llama", "q0f32"), ("tiny-llama", "q0f16")]
)
# AutoAWQ-style checkpoints made from these (their plain twin is the reference)
AWQ = ("llama", "mixtral")
# Tensor-parallel builds, "NAME-PRESET-tpN", next to their unsharded twin "NAME-PRESET":
# (checkpoint name, family, config changes, preset, N). "llama-wide" has 4 KV heads of head_dim
# 64, so that 4 GPUs each take one, and the example's tokenizer (its vocabulary), for serving.
WIDE = dict(
    hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=2048,
)  # fmt: skip
# Vocabularies whose greedy sampler runs in chunks (kiln.compiler.sampling.CHUNKED_FROM): one a
# divisor splits, one it pads; each built alone as greedy-VOCAB.so
GREEDY_VOCABS = (128256, 70001)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
TENSOR_PARALLEL = [
    ("llama-wide", "llama", WIDE, "q0f16", n) for n in (1, 2, 4)
] + [
    ("llama-wide", "llama", WIDE, "q4f16", n) for n in (1, 2)
] + [("mixtral", "mixtral", {}, "q0f16", n) for n in (1, 2)]  # fmt: skip
# Models whose prefill attention runs on Kiln's kernels (head_dim 64 or 128; the other tiny models'
# 16 and 32 keep TVM's), "NAME-q0f16" against transformers in test_attention.py: llama-wide
# (head_dim 64, above) and a head_dim 128 one with 2 query heads per KV head.
ATTENTION_MODELS = {
    "llama-wide": WIDE,
    "llama-hd128": dict(
        hidden_size=256, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1
    ),
}
# (dtype, query heads, KV heads, head_dim) test_attention.py runs Kiln's kernels and TVM's on
ATTENTION_CONFIGS = [
    (dtype, h_q, h_kv, head_dim)
    for dtype in ("float16", "bfloat16")
    for head_dim in (64, 128)
    for h_q, h_kv in ((8, 8), (8, 2), (8, 1))
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument(
        "--tensor-parallel-only", action="store_true", help="only what a multi-GPU host tests"
    )
    parser.add_argument(
        "--attention-only", action="store_true", help="only what tests/gpu/test_attention.py loads"
    )
    parser.add_argument(
        "--gemv-only", action="store_true", help="only what tests/gpu/test_gemv_kernels.py loads"
    )
    parser.add_argument(
        "--sampling-only", action="store_true", help="only the greedy samplers built alone"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.attention_only or args.gemv_only or args.sampling_only:
        if args.attention_only:
            build_attention(args.out, args.arch)
        if args.gemv_only:
            build_gemv(args.out, args.arch)
        if args.sampling_only:
            build_sampling(args.out, args.arch)
        return
    build_tensor_parallel(args.out, args.arch)
    if not args.tensor_parallel_only:
        build_attention(args.out, args.arch)
        build_gemv(args.out, args.arch)
        build_sampling(args.out, args.arch)
        build_single_gpu(args.out, args.arch)


def build_gemv(out: Path, arch: str) -> None:
    from kiln.runtime import cublas, gemv

    shutil.copyfile(gemv.build([arch]), out / gemv.ARTIFACT_FILE)
    # kiln.gemv.q4_batched multiplies many rows on the cuBLAS extern
    shutil.copyfile(cublas.build(), out / cublas.ARTIFACT_FILE)
    # llama-wide q4f16 (K % 128 == 0: its batched decode takes the warpgroup MMAs on Hopper)
    # and its weights dequantized, for test_cuda.py
    build_tensor_parallel(out, arch, only=("llama-wide", "q4f16", 1))
    wide = "llama-wide-q4f16"
    dequantized(out / "ckpt-llama-wide", out / wide, out / f"ckpt-{wide}-dequantized")


def build_sampling(out: Path, arch: str) -> None:
    """kiln.compiler.sampling.greedy alone, (n, vocab) float32 logits -> (n,) int32, through the
    CUDA target's pipeline, for each of GREEDY_VOCABS: greedy-VOCAB.so."""
    import tvm
    from tvm.relax.frontend import nn

    from kiln.compiler import sampling
    from kiln.compiler.pipeline import relax_pipeline
    from kiln.targets import get_target

    class Greedy(nn.Module):
        def greedy(self, logits: nn.Tensor):
            return sampling.greedy(logits)

    spec = get_target("cuda")
    target = spec.target(arch)
    for vocab in GREEDY_VOCABS:
        mod, _ = Greedy().export_tvm(
            spec={"greedy": {"logits": nn.spec.Tensor(["n", vocab], "float32")}}
        )
        with tvm.transform.PassContext(config=dict(spec.pass_config)):
            executable = tvm.compile(mod, target, relax_pipeline=relax_pipeline(spec, target, None))
        spec.export(executable, str(out / f"greedy-{vocab}.so"), arch)


def dequantized(ckpt: Path, art: Path, out: Path) -> None:
    """transformers' reference for a quantized artifact: the weights it holds, dequantized."""
    from models.test_quantized import dequantized_checkpoint

    if not out.exists():
        dequantized_checkpoint(ckpt, art, out)


def build_attention(out: Path, arch: str) -> None:
    from kiln.runtime import attention

    shutil.copyfile(attention.build([arch]), out / attention.ARTIFACT_FILE)
    # TVM's attention kernels, as bench/attention.py builds them
    path = Path(__file__).resolve().parents[2] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("kiln_bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (out / bench.TVM_LIBRARY).exists():
        print("compiling TVM's attention kernels", flush=True)
        bench.build_tvm_kernels(out / bench.TVM_LIBRARY, ATTENTION_CONFIGS, arch)
    for name, changes in ATTENTION_MODELS.items():
        ckpt = out / f"ckpt-{name}"
        if not ckpt.exists():
            make_checkpoint("llama", ckpt, **changes)
        art = out / f"{name}-q0f16"
        if not (art / "manifest.json").exists():
            print(f"compiling {art.name}", flush=True)
            kiln.compile(str(ckpt), target="cuda", quantization="q0f16", output=art, arch=arch)


def build_tensor_parallel(out: Path, arch: str, only: tuple[str, str, int] | None = None) -> None:
    for name, family, changes, preset, n in TENSOR_PARALLEL:
        if only is not None and (name, preset, n) != only:
            continue
        ckpt = out / f"ckpt-{name}"
        if not ckpt.exists():
            make_checkpoint(family, ckpt, **changes)
            if changes.get("vocab_size") == 2048:
                for f in EXAMPLE.glob("tokenizer*"):
                    shutil.copyfile(f, ckpt / f.name)
        art = out / (f"{name}-{preset}" + (f"-tp{n}" if n > 1 else ""))
        if not (art / "manifest.json").exists():
            print(f"compiling {art.name}", flush=True)
            kiln.compile(str(ckpt), target="cuda", quantization=preset, output=art, arch=arch,
                         tensor_parallel=n)  # fmt: skip


def build_single_gpu(out: Path, arch: str) -> None:
    example = EXAMPLE
    for name, preset in BUILDS:
        ckpt = out / f"ckpt-{name}"
        if name == "tiny-llama":
            ckpt = example
        elif not ckpt.exists():
            make_checkpoint(name, ckpt)
        art = out / f"{name}-{preset}"
        if not (art / "manifest.json").exists():
            print(f"compiling {name} {preset}", flush=True)
            kiln.compile(str(ckpt), target="cuda", quantization=preset, output=art, arch=arch)
        if preset.startswith(("q4", "fp8")):
            dequantized(ckpt, art, out / f"ckpt-{name}-{preset}-dequantized")
    for name in AWQ:
        from models.test_quantized import awq_checkpoints

        made = out / f"ckpt-{name}-awq"
        if not made.exists():
            awq_checkpoints(out / f"ckpt-{name}", made)
        art = out / f"{name}-q4f16_awq"
        if not (art / "manifest.json").exists():
            print(f"compiling {name} q4f16_awq", flush=True)
            kiln.compile(str(made / "awq"), target="cuda", quantization="q4f16_awq", output=art,
                         arch=arch)  # fmt: skip
    # A CPU build of the same weights: the engine's greedy outputs must agree across devices.
    art = out / "llama-q0f32-cpu"
    if not (art / "manifest.json").exists():
        kiln.compile(str(out / "ckpt-llama"), target="cpu", quantization="q0f32", output=art)
    # The same model through NVRTC (no CUDA toolkit), for the runtime to load and compare.
    art = out / "tiny-llama-q0f16-nvrtc"
    if not (art / "manifest.json").exists():
        os.environ["KILN_CUDA_COMPILER"] = "nvrtc"
        kiln.compile(str(example), target="cuda", quantization="q0f16", output=art, arch=arch)


if __name__ == "__main__":
    main()
