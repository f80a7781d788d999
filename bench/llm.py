"""The H100 benchmark: Kiln artifacts and the transformers peer on one card, each figure next
to its roofline, measured ceilings of the same run, one JSON and one Markdown section out.

On the build machine: a random checkpoint of the shape (bench/shapes.py), compiled with
`kiln compile` (time it: the compile time is a figure); carry the artifacts without their
weight files. On the GPU machine:

    python bench/llm.py ARTIFACT... --out DIR [--peer SHAPE] [--compile-peer]

fills each artifact's weights (bench/random_weights.py), measures the copy bandwidth and the
dense fp16 GEMM peak (torch.matmul, the fastest GEMM present), runs `kiln bench` on each, then
the peer in its own process (bench/peer_transformers.py) on SHAPE (bench/shapes.py), the
shape the artifacts were compiled from.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from gemm import torch_gemm  # noqa: E402
from random_weights import fill  # noqa: E402
from shapes import SHAPES, config_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peer", choices=sorted(SHAPES), help="measure transformers too")
    parser.add_argument("--compile-peer", action="store_true")
    parser.add_argument("--batches", default="8,32,64,128")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from kiln.runtime.benchmark import run

    peak, _ = torch_gemm()
    if peak is None:
        raise SystemExit("bench/llm.py measures the GEMM peak with torch: it needs torch with CUDA")
    print(f"dense fp16 GEMM (torch, 8192^3): {peak / 1e12:.0f} TFLOP/s", flush=True)
    results = {"gemm_flops": peak, "artifacts": {}}
    for art in args.artifacts:
        manifest = json.loads((art / "manifest.json").read_text())
        if not all((art / f).exists() for f in manifest["files"]):
            t0 = time.perf_counter()
            fill(art)
            print(f"{art.name}: random weights in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"== {art.name} ({manifest['quantization']['name']})", flush=True)
        batches = tuple(int(b) for b in args.batches.split(","))
        report = run(art, "cuda", gemm_flops=peak, batches=batches,
                     say=lambda s: print(s, flush=True))  # fmt: skip
        results["artifacts"][art.name] = {
            "quantization": manifest["quantization"]["name"],
            # a tensor-parallel artifact runs on cuda:0..N-1 (bandwidth: one GPU's)
            "tensor_parallel": report.tensor_parallel,
            "allreduce_bandwidth": report.allreduce_bandwidth,
            "compile_seconds": manifest.get("build", {}).get("compile_seconds"),
            "bandwidth": report.bandwidth,
            "finite_logits": report.finite_logits,
            "figures": [vars(f) | {"percent": f.percent} for f in report.figures],
        }
        del report
        gc.collect()
        (args.out / "llm.json").write_text(json.dumps(results, indent=1))
    if args.peer:
        layers = json.loads((args.artifacts[0] / "manifest.json").read_text())["model"]["config"]
        config = config_of(args.peer, layers["num_hidden_layers"])
        (args.out / "config.json").write_text(json.dumps(config))
        cmd = [sys.executable, str(BENCH / "peer_transformers.py"), str(args.out / "config.json"),
               "--json", str(args.out / "peer.json")]  # fmt: skip
        subprocess.run(cmd + (["--compile"] if args.compile_peer else []), check=False)


if __name__ == "__main__":
    main()
