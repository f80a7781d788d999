"""Where a decode step's GPU time goes (batch 1, or --batch B sequences at a time; or, with
--prefill N, an N-token prefill's):
every kernel of `steps` passes, summed by name, from torch's profiler (CUPTI sees the kernels of
every library in the process, TVM's too, inside CUDA graphs as well), and the GPU's idle time
between kernels. Fills the artifact's weights first when it has none.

    python bench/profile_decode.py ARTIFACT [--context 128] [--batch 1] [--steps 20] [--prefill N]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="sequences a decode step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill", type=int, help="profile prefills of this many tokens")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kiln.runtime.runner import Runner

    if not any((args.artifact / "params").glob("*.safetensors")):
        from random_weights import fill

        fill(args.artifact)
    batch = args.batch
    kv_tokens = 8192 + batch * (args.context + 256)  # a prefill's, and the decode's contexts
    runner = Runner(args.artifact, "cuda", max_batch_size=batch, kv_tokens=kv_tokens)
    rng = np.random.default_rng(0)

    def prefill() -> None:
        tokens = rng.integers(3, runner.vocab_size, args.prefill).tolist()
        runner.kv.add(batch)  # a sequence beside the decode's
        for at in range(0, len(tokens), runner.prefill_chunk):  # as the engine chunks it
            runner.prefill([batch], [tokens[at : at + runner.prefill_chunk]])
        runner.kv.remove(batch)

    def decode() -> None:
        runner.decode(list(range(batch)), [5] * batch, on_device=True).greedy()

    step = prefill if args.prefill else decode
    for seq in range(batch):  # sequences 0 .. batch - 1, each with its own context
        runner.kv.add(seq)
        runner.prefill([seq], [rng.integers(3, runner.vocab_size, args.context).tolist()])
    for _ in range(3):  # warm up (and capture the CUDA graphs)
        step()
    runner.device.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        runner.device.sync()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    events = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start
    )
    gaps: dict[tuple[str, str], float] = {}  # GPU idle time between two kernels, by the pair
    for event, after in itertools.pairwise(events):
        idle = after.time_range.start - event.time_range.end
        if idle > 0:
            key = (event.name[:40], after.name[:40])
            gaps[key] = gaps.get(key, 0.0) + idle / args.steps
    for event in events:
        kernels.setdefault(event.name, []).append(event.device_time_total)
    rows = sorted(
        ((name, sum(t) / args.steps, len(t) / args.steps) for name, t in kernels.items()),
        key=lambda r: -r[1],
    )
    total = sum(r[1] for r in rows)
    what = f"{args.prefill}-token prefill" if args.prefill else f"decode step of {batch}"
    print(f"GPU time per {what}: {total / 1000:.3f} ms in {sum(r[2] for r in rows):.0f} kernels")
    for name, us, calls in rows[:40]:
        print(f"{us:9.1f} us {100 * us / total:5.1f}%  x{calls:<4.0f} {name[:90]}")
    span = (events[-1].time_range.end - events[0].time_range.start) / args.steps
    print(f"GPU busy {total:.0f} us of each step's {span:.0f} us span; idle between kernels:")
    for (before, after), us in sorted(gaps.items(), key=lambda g: -g[1])[:12]:
        print(f"{us:9.1f} us idle  {before} -> {after}")
    if args.json:
        args.json.write_text(json.dumps([dict(name=n, us=u, calls=c) for n, u, c in rows]))


if __name__ == "__main__":
    main()
