"""Where a batch-1 decode step's GPU time goes: every kernel of `steps` decode steps, summed by
name, from torch's profiler (CUPTI sees the kernels of every library in the process, TVM's too,
inside CUDA graphs as well). Fills the artifact's weights first when it has none.

    python bench/profile_decode.py ARTIFACT [--context 128] [--steps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kiln.runtime.runner import Runner

    if not any((args.artifact / "params").glob("*.safetensors")):
        from random_weights import fill

        fill(args.artifact)
    runner = Runner(args.artifact, "cuda", max_batch_size=1, kv_tokens=4096)
    rng = np.random.default_rng(0)
    runner.kv.add(0)
    runner.prefill([0], [rng.integers(3, runner.vocab_size, args.context).tolist()])
    for _ in range(3):  # warm up (and capture the CUDA graphs)
        runner.decode([0], [5], on_device=True).greedy()
    runner.device.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.decode([0], [5], on_device=True).greedy()
        runner.device.sync()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels.setdefault(event.name, []).append(event.device_time_total)
    rows = sorted(
        ((name, sum(t) / args.steps, len(t) / args.steps) for name, t in kernels.items()),
        key=lambda r: -r[1],
    )
    total = sum(r[1] for r in rows)
    print(f"GPU time per decode step: {total / 1000:.3f} ms in {sum(r[2] for r in rows):.0f} "
          f"kernels (context {args.context})")  # fmt: skip
    for name, us, calls in rows[:40]:
        print(f"{us:9.1f} us {100 * us / total:5.1f}%  x{calls:<4.0f} {name[:90]}")
    if args.json:
        args.json.write_text(json.dumps([dict(name=n, us=u, calls=c) for n, u, c in rows]))


if __name__ == "__main__":
    main()
