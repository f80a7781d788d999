"""Per-step costs of the runtime on one artifact: decode latency at batch 1 through the
batch-1 entry point and through the general one, what choosing tokens costs on the host versus
in the artifact's sampling kernels, and the engine's host overhead per step. Each decode figure
is printed next to its roofline: the weight bytes a step must read (the embedding table
excepted) / the measured copy bandwidth of the device.

    python bench/engine_step.py ARTIFACT --device cuda [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tvm

import kiln
from kiln.runtime.benchmark import copy_bandwidth, decode_weight_bytes
from kiln.runtime.runner import Logits, Runner
from kiln.runtime.sampler import SamplingParams, TokenSampler


def timed(device, fn, reps: int) -> float:
    fn()
    device.sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    device.sync()
    return (time.perf_counter() - start) / reps


def decode_latency(runner: Runner, context: int, steps: int) -> dict[str, float]:
    """Seconds per batch-1 decode step, at a `context`-token history, through each entry."""
    rng = np.random.default_rng(0)
    seq = 1
    runner.kv.add(seq)
    runner.prefill([seq], [rng.integers(3, runner.vocab_size, context).tolist()])
    token = tvm.runtime.tensor(np.array([[5]], dtype="int32"), runner.device)
    out = {}
    for name in ("decode_1", "decode"):
        entry = runner.vm[name]

        def step(entry=entry):
            runner.kv.begin([seq], [1])
            _, runner.kv.cache = entry(token, runner.kv.cache, runner.params)
            runner.kv.end()

        out[name] = timed(runner.device, step, steps)
    runner.kv.remove(seq)
    return out


def sampling_cost(runner: Runner, batch: int, reps: int = 50) -> dict[str, float]:
    """Seconds to choose `batch` tokens from logits on the device: host vs kernels."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((batch, runner.vocab_size), dtype=np.float32) * 3
    tensor = tvm.runtime.tensor(logits, runner.device)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    samplers = [TokenSampler(params, [1], runner.vocab_size) for _ in range(batch)]
    out = {
        "greedy_host": timed(runner.device, lambda: np.argmax(tensor.numpy(), axis=-1), reps),
        "greedy_device": timed(runner.device, lambda: Logits(runner, tensor).greedy(), reps),
        "top_p_host": timed(runner.device, lambda: _host_sample(samplers, tensor), reps),
    }
    u = rng.random(batch)
    t, p, k = [0.8] * batch, [0.9] * batch, [0] * batch
    out["top_p_device"] = timed(
        runner.device, lambda: Logits(runner, tensor).sample(t, p, k, u), reps
    )
    return out


def _host_sample(samplers: list[TokenSampler], tensor) -> list[int]:
    return [s(row)[0] for s, row in zip(samplers, tensor.numpy(), strict=True)]


def engine_overhead(path: Path, device: str, batch: int, new_tokens: int) -> dict[str, float]:
    rng = np.random.default_rng(2)
    with kiln.Engine(path, device=device, max_batch_size=batch, kv_tokens=batch * 320) as engine:
        prompts = [[1, *rng.integers(3, 1000, 127).tolist()] for _ in range(batch)]
        engine.generate(prompts, max_tokens=new_tokens, temperature=0, ignore_eos=True)
        s = engine.stats
        return {"step_ms": s.step_ms, "host_ms": s.host_ms, "max_host_ms": s.max_host_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runner = Runner(args.artifact, args.device, max_batch_size=32, kv_tokens=4096)
    dev = runner.device
    bw = copy_bandwidth(dev)
    weight_bytes = decode_weight_bytes(runner)
    roofline = weight_bytes / bw
    result = {
        "device": str(dev),
        "decode_weight_bytes": weight_bytes,
        "copy_bandwidth_GBps": bw / 1e9,
        "decode_roofline_ms": roofline * 1e3,
    }
    lat = decode_latency(runner, context=128, steps=100)
    for name, sec in lat.items():
        result[f"{name}_ms"] = sec * 1e3
        result[f"{name}_pct_roofline"] = 100 * roofline / sec
    for batch in (1, 32):
        for name, sec in sampling_cost(runner, batch).items():
            result[f"sample_{name}_b{batch}_ms"] = sec * 1e3
    del runner
    for batch in (1, 32):
        for name, v in engine_overhead(args.artifact, args.device, batch, 64).items():
            result[f"engine_b{batch}_{name}"] = v
    for key, value in result.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
