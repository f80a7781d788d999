"""Peak memory of weight conversion on a >= 1 GB checkpoint.

Writes a random Llama-shaped bf16 checkpoint (sharded safetensors with an index, as published
checkpoints are) into a temporary directory, converts it with each preset in a fresh process
(conversion only: `weights.convert` with the preset's layout, no codegen), and reports each
process's peak resident memory during the conversion against the limit

    two input shards + one converted tensor

where "one converted tensor" is the largest parameter as conversion holds it: its float32
value plus everything the preset turns it into.

    python bench/convert_memory.py [--layers 9] [--shards 3] [--presets q4f16,q0f16]

The peak is the kernel's high-water mark (VmHWM in /proc/self/status, Linux), reset with
/proc/self/clear_refs just before the conversion starts; the baseline is VmRSS at that point
(Python, NumPy, TVM and Kiln imported), and the figure compared with the limit is the peak
above that baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1e6
# Llama-2-style shapes at hidden 2048 (TinyLlama 1.1B's), grouped-query attention.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = h // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (h, h),
                f"{p}.self_attn.k_proj.weight": (kv, h),
                f"{p}.self_attn.v_proj.weight": (kv, h),
                f"{p}.self_attn.o_proj.weight": (h, h),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.mlp.gate_proj.weight": (i, h),
                f"{p}.mlp.up_proj.weight": (i, h),
                f"{p}.mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    import ml_dtypes

    std = np.float32(shape[-1] ** -0.5 if len(shape) == 2 else 1.0)
    values = rng.standard_normal(shape, dtype=np.float32) * std
    return values.astype(ml_dtypes.bfloat16)


def make_checkpoint(out: Path, layers: int, shards: int) -> list[int]:
    """Writes the checkpoint; returns each shard's size in bytes."""
    import safetensors.numpy

    shapes = tensor_shapes(layers)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    budget, groups, size = total / shards, [[]], 0
    for name, shape in shapes.items():  # consecutive tensors, about total / shards each
        if size >= budget * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += int(np.prod(shape)) * 2
    rng = np.random.default_rng(0)
    weight_map, sizes = {}, []
    for k, names in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: random_bf16(shapes[n], rng) for n in names}
        safetensors.numpy.save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, fname))
        sizes.append((out / fname).stat().st_size)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}))
    return sizes


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(preset_name: str, ckpt_dir: Path, out_dir: Path) -> None:
    """Converts in this process and prints a JSON line of measurements."""
    from kiln.compiler.config import read_hf_config
    from kiln.compiler.quantization import for_checkpoint, get_quantization
    from kiln.compiler.quantization.base import np_dtype
    from kiln.compiler.weights import Checkpoint, convert
    from kiln.models import family_of

    hf_config = read_hf_config(ckpt_dir)
    preset, hf_config = for_checkpoint(get_quantization(preset_name), hf_config, ckpt_dir)
    family = family_of(hf_config)
    config = family.config_class.from_hf(hf_config)
    layout = preset.quantize_model(family.model_class(config, preset.model_dtype))
    params, weight_map = layout.conversion(family.weight_map(config))

    def out_bytes(name: str) -> int:
        outs = {name: layout.imported[name]} if name in layout.imported else layout.outputs(name)
        return sum(int(np.prod(s)) * np.dtype(np_dtype(d)).itemsize for s, d in outs.values())

    converted = max(int(np.prod(params[p])) * 4 + out_bytes(p) for p in params)
    ckpt = Checkpoint(ckpt_dir)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = _status("VmRSS")
    start = time.monotonic()
    kwargs = {"outputs": layout.produces} if hasattr(layout, "produces") else {}
    convert(ckpt, params, weight_map, layout.transform, out_dir, family.ignore, **kwargs)
    seconds = time.monotonic() - start
    peak = _status("VmHWM")
    written = sum(p.stat().st_size for p in out_dir.glob("params-*.safetensors"))
    print(
        json.dumps(
            {
                "baseline": baseline,
                "peak": peak,
                "seconds": seconds,
                "converted_tensor": converted,
                "written": written,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=9, help="decoder layers (9: about 1.07 GB)")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--presets", default="q4f16,q0f16")
    parser.add_argument(
        "--child", nargs=3, metavar=("PRESET", "CKPT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    with tempfile.TemporaryDirectory(prefix="kiln-convert-memory-") as tmp:
        ckpt = Path(tmp) / "checkpoint"
        ckpt.mkdir()
        start = time.monotonic()
        sizes = make_checkpoint(ckpt, args.layers, args.shards)
        print(
            f"checkpoint: {sum(sizes) / MB:.0f} MB bf16 in {len(sizes)} shards "
            f"({', '.join(f'{s / MB:.0f}' for s in sizes)} MB), {args.layers} layers, "
            f"written in {time.monotonic() - start:.0f} s"
        )
        two_shards = sum(sorted(sizes)[-2:])
        print(
            f"{'preset':8} {'baseline':>9} {'peak':>9} {'peak-base':>9} {'limit':>9} "
            f"{'written':>9} {'time':>6}  (MB; limit = two largest shards + one converted "
            "tensor)"
        )
        for preset in args.presets.split(","):
            out = Path(tmp) / f"out-{preset}"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", preset, str(ckpt), str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                sys.exit(f"{preset}: conversion failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            used = r["peak"] - r["baseline"]
            limit = two_shards + r["converted_tensor"]
            print(
                f"{preset:8} {r['baseline'] / MB:9.0f} {r['peak'] / MB:9.0f} {used / MB:9.0f} "
                f"{limit / MB:9.0f} {r['written'] / MB:9.0f} {r['seconds']:5.0f}s  "
                + ("within the limit" if used <= limit else "OVER the limit")
            )


if __name__ == "__main__":
    main()
