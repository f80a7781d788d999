"""Fill a compiled artifact's weight files with seeded random values, in place.

Benchmarks compile a model shape on the build machine and carry the artifact without its
weights (gigabytes); this writes weights of the right names, shapes and dtypes where the
benchmark runs, and updates the manifest's sizes and checksums so the artifact verifies.
Float matrices are N(0, 1/fan_in), vectors near 1, Kiln's int4 weights the codes 1..15 equally
likely (-7..7) with scales that give them the float matrices' std, other packed integers
uniform bits.

    python bench/random_weights.py ARTIFACT [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kiln.runtime.artifact import file_entry


def fill(artifact: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    rng = np.random.default_rng(seed)
    by_file: dict[str, list[dict]] = {}
    for p in manifest["params"]:
        # one file, or (tensor parallel) one per GPU, each holding that GPU's part
        for rel in p.get("files") or [p["file"]]:
            by_file.setdefault(rel, []).append(p)
    for rel, params in by_file.items():
        tensors = {p["name"]: _random(rng, p["name"], tuple(p["shape"]), p["dtype"])
                   for p in params}  # fmt: skip
        path = artifact / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        tensors.clear()
        manifest["files"][rel] = file_entry(path)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype == "uint32" and name.endswith("qweight"):  # Kiln's int4: eight codes a word
        return _int4_words(rng, shape)
    if dtype in ("uint32", "int32", "uint8", "int8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if "scale" in name:
        # Scales that give the int4 codes (CODE_STD) the float weights' std,
        # 1/sqrt(fan_in), so that activations keep their size layer after layer (a fixed 0.02
        # made a 7B's down projection overflow fp16: inf, then NaN logits and, in a mixture of
        # experts, NaN router weights that route every token to every expert). fan_in: 32 per
        # group of a (rows, groups) scale (Kiln's int4 groups); per-channel scales, 4096.
        fan_in = 32 * shape[-1] if len(shape) == 2 and shape[-1] > 1 else 4096
        value = fan_in**-0.5 / CODE_STD
        return np.full(shape, value, dtype=np.float32).astype(_float(dtype))
    scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
    offset = 1.0 if len(shape) == 1 else 0.0
    if _torch_cuda() and dtype in ("float16", "float32"):  # seconds instead of minutes for 7B
        import torch

        gen = torch.Generator("cuda").manual_seed(int(rng.integers(1 << 62)))
        values = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
        return (values * scale + offset).to(getattr(torch, dtype)).cpu().numpy()
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    return values.astype(_float(dtype))


# Kiln's int4 codes are stored as nib = w / scale + 8: codes 1..15 equally likely give the values
# -7..7, zero-mean as a symmetric quantizer's are (all 16 would add a mean of -0.5 to every
# weight, the same for every row: a common component that grows activations layer by layer).
CODE_STD = float(np.sqrt((15**2 - 1) / 12))  # of -7..7 uniform


def _int4_words(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    shifts = 4 * np.arange(8)
    if _torch_cuda():
        import torch

        gen = torch.Generator("cuda").manual_seed(int(rng.integers(1 << 62)))
        codes = torch.randint(1, 16, (count, 8), generator=gen, device="cuda", dtype=torch.int64)
        words = (codes << torch.tensor(shifts, device="cuda")).sum(dim=1)
        return words.cpu().numpy().astype(np.uint32).reshape(shape)
    codes = rng.integers(1, 16, (count, 8), dtype=np.uint32)
    return (codes << shifts.astype(np.uint32)).sum(axis=1, dtype=np.uint32).reshape(shape)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _float(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fill(args.artifact, args.seed)
