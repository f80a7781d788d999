"""Model shapes the benchmarks use, and random checkpoints of them.

No checkpoint can be downloaded where the benchmarks run, and all-zero weights would flatter
every kernel (and give degenerate tokens), so `write_checkpoint` writes seeded random weights in
the scale of a trained model's: N(0, 1/fan_in) matrices, unit norms. `layers` cuts the model to
fewer layers of the same width: a per-layer figure needs only a couple of them. `sparse` writes
zeros as sparse files instead (no disk space, no time), for compiling a shape whose checkpoint
does not fit the build machine's disk (the whole Mixtral-8x7B: 93 GB); the compiled artifact is
then carried without its weights and filled where it runs (bench/random_weights.py), as every
benchmark artifact is.

    python bench/shapes.py llama2-7b OUT [--layers 2] [--sparse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHAPES: dict[str, dict] = {
    "llama2-7b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "llama2-70b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=32768, rope_theta=1e6, num_local_experts=8,
        num_experts_per_tok=2,
    ),
}  # fmt: skip

COMMON = dict(
    model_type="llama", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, torch_dtype="float16",
    tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip


def config_of(shape: str, layers: int | None = None) -> dict:
    config = {**COMMON, **SHAPES[shape]}
    if "Mixtral" in config["architectures"][0]:
        config["model_type"] = "mixtral"
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama or Mixtral checkpoint."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
        }
        experts = config.get("num_local_experts")
        if experts:
            out[p + "block_sparse_moe.gate.weight"] = (experts, h)
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out |= {q + "w1.weight": (i, h), q + "w3.weight": (i, h), q + "w2.weight": (h, i)}
        else:
            out |= {
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
    return out


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    scale = np.float32(shape[-1] ** -0.5)
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file of fp16 zeros whose data is a hole: the header, then the file's size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in shapes.items():
        end = offset + 2 * int(np.prod(dims))
        header[name] = {"dtype": "F16", "shape": list(dims), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)


def write_checkpoint(
    shape: str,
    out: Path,
    layers: int | None = None,
    shard_bytes: int = 2 << 30,
    seed: int = 0,
    sparse: bool = False,
) -> Path:
    """A random fp16 safetensors checkpoint of `shape` (`sparse`: of zeros, as sparse files),
    sharded, with an index."""
    from safetensors.numpy import save_file

    config = config_of(shape, layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    # Shards are written as they fill, so memory holds one shard, not the model; they are
    # renamed to the usual -of-N names once N is known.
    names = tensor_shapes(config)
    weight_map: dict[str, str] = {}
    files: list[str] = []
    shard: dict[str, np.ndarray | tuple[int, ...]] = {}
    size = 0

    def flush() -> None:
        files.append(f"shard-{len(files) + 1:05d}.safetensors")
        if sparse:
            write_sparse(out / files[-1], shard)
        else:
            save_file(shard, str(out / files[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[-1]))
        shard.clear()

    for name, dims in names.items():
        nbytes = 2 * int(np.prod(dims))
        if size and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = dims if sparse else random_tensor(rng, dims)
        size += nbytes
    flush()
    final = {f: f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k, f in enumerate(files)}
    for old, new in final.items():
        (out / old).rename(out / new)
    weight_map = {name: final[f] for name, f in weight_map.items()}
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--sparse", action="store_true", help="zeros, in no disk space")
    args = parser.parse_args()
    print(write_checkpoint(args.shape, args.out, args.layers, sparse=args.sparse))
