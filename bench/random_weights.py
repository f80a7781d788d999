"""Fill a compiled artifact's weight files with seeded random values, in place.

Benchmarks compile a model shape on the build machine and carry the artifact without its
weights (gigabytes); this writes weights of the right names, shapes and dtypes where the
benchmark runs, and updates the manifest's sizes and checksums so the artifact verifies.
Float matrices are N(0, 1/fan_in), vectors near 1, packed integer weights uniform bits (every
4-bit code equally likely), scales at the size a quantizer would give such weights.

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
    if dtype in ("uint32", "int32", "uint8", "int8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if "scale" in name:  # per-group or per-channel scales of weights N(0, 1/fan_in)
        return np.full(shape, 0.02, dtype=np.float32).astype(_float(dtype))
    scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
    offset = 1.0 if len(shape) == 1 else 0.0
    if _torch_cuda() and dtype in ("float16", "float32"):  # seconds instead of minutes for 7B
        import torch

        gen = torch.Generator("cuda").manual_seed(int(rng.integers(1 << 62)))
        values = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)
        return (values * scale + offset).to(getattr(torch, dtype)).cpu().numpy()
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    return values.astype(_float(dtype))


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
