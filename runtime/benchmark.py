"""`kiln bench`: what an artifact does on this device, each figure next to its roofline.

Figures (the H100 performance issue's list), all through `kiln.Engine`, the path users run:
- load: seconds to open the artifact (checksums, weights to the device, KV cache);
- decode at batch 1: tokens/s of one greedy request after a 128-token prompt (256 new tokens);
  greedy decodes run the engine's default passes a step (kiln.runtime.engine.DECODE_STEPS in
  a row on a GPU);
- prefill: tokens/s of a 512- and a 2048-token prompt in a single pass, and the time to first
  token: the best of 3 after one of the same length (the first pass of a length grows the
  device's memory pools; the transformers peer is timed the same way);
- batched decode: tokens/s of B requests of 512-token prompts decoding together (128 new
  tokens each), counted over the steps in which every request decodes and none prefills.
Before timing, a prompt's logits are checked: weights whose activations overflow (random ones
of the wrong size) give NaN or inf, which a run says in a warning (and `finite_logits`), since
work that depends on the values (a mixture of experts' routing) is then not the real work.

Rooflines: a decode step must read every weight once (the embedding table excepted: a step
reads one row of it per sequence; of a mixture of experts, the experts its tokens route to) plus
each sequence's K/V history, so its time is at least
bytes / bandwidth, with the bandwidth measured here as a device-to-device copy. Prefill is
bounded by FLOPs / dense-GEMM peak; the runtime has no GEMM library to measure that peak
with, so callers pass it (`bench/llm.py` measures it with torch).

A tensor-parallel artifact runs over its N GPUs (`devices`): every GPU reads its own shard at
the same time, so a decode step takes at least one GPU's bytes (its weights and its share of the
KV heads) over one GPU's bandwidth, plus the all-reduce volume (two all-reduces of each token's
hidden state per layer, moving 2(N-1)/N of their bytes each) over the bus bandwidth of an
all-reduce measured here; prefill takes at least its FLOPs over N GEMM peaks plus that all-reduce
time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from kiln.runtime.artifact import Manifest
from kiln.runtime.engine import Engine
from kiln.runtime.errors import KilnError

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    roofline: float | None = None  # the same unit: the best the hardware allows

    @property
    def percent(self) -> float | None:
        return None if not self.roofline else 100 * self.value / self.roofline

    def line(self) -> str:
        text = f"{self.name:34s} {self.value:12.4g} {self.unit}"
        if self.roofline:
            text += f"   roofline {self.roofline:.4g} ({self.percent:.1f}%)"
        return text


@dataclass
class Report:
    device: str
    bandwidth: float  # bytes/s, read + written (of one GPU, with tensor parallelism)
    gemm_flops: float | None
    figures: list[Figure] = field(default_factory=list)
    tensor_parallel: int = 1
    allreduce_bandwidth: float | None = None  # bytes/s (bus), with tensor parallelism
    finite_logits: bool | None = None  # of a prompt's prefill: False times overflowing weights

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.figures.append(Figure(*args, **kwargs))

    def text(self) -> str:
        head = [f"device: {self.device}", f"copy bandwidth: {self.bandwidth / 1e9:.0f} GB/s"]
        if self.tensor_parallel > 1:
            head.append(
                f"tensor parallel over {self.tensor_parallel} GPUs: bandwidth and decode "
                "rooflines per GPU"
            )
        if self.gemm_flops:
            head.append(f"dense GEMM peak: {self.gemm_flops / 1e12:.0f} TFLOP/s")
        return "\n".join(head + [f.line() for f in self.figures])


NOT_FINITE = (
    "warning: this artifact's logits are not finite (its weights overflow the model dtype): the "
    "figures time NaN and inf, and a mixture of experts routes every token to every expert"
)


def finite_logits(runner: Any, prompt: list[int]) -> bool:
    """Whether a prefill of `prompt` gives finite logits (a sequence of its own, removed after)."""
    seq = 1 << 30  # an id the engine does not give
    runner.kv.add(seq)
    try:
        return bool(np.isfinite(runner.prefill([seq], [prompt])).all())
    finally:
        runner.kv.remove(seq)


def copy_bandwidth(device: Any, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = tvm.runtime.empty((nbytes // 4,), "float32", device)
    b = tvm.runtime.empty((nbytes // 4,), "float32", device)
    # Written first: on the CPU an untouched allocation reads as the shared zero page, which
    # would measure the cache, not memory.
    a.copyfrom(np.ones(nbytes // 4, dtype=np.float32))
    a.copyto(b)
    device.sync()
    start = time.perf_counter()
    for _ in range(reps):
        a.copyto(b)
    device.sync()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def decode_weight_bytes(artifact: Any, batch: int = 1) -> int:
    """Weight bytes a decode step of `batch` sequences must read (of one GPU's shard, with
    tensor parallelism), from the manifest of `artifact` (a Runner or a Manifest): all but the
    embedding table (unless the LM head shares it), and of a mixture of experts only the experts
    the step routes to: k of N for one token; for `batch` tokens routed independently and
    evenly, the expected share of experts at least one of them chose, 1 - (1 - k/N)^batch."""
    manifest: Manifest = artifact if isinstance(artifact, Manifest) else artifact.manifest
    params = manifest.params
    tied = not any(p["name"].startswith("lm_head.") for p in params)
    experts = manifest.config.get("num_local_experts") or 0
    active = 1.0
    if experts:
        active = 1 - (1 - manifest.config["num_experts_per_tok"] / experts) ** batch
    total = 0.0
    for p in params:
        if tied or not p["name"].startswith("embed_tokens."):
            nbytes = math.prod(p["shape"]) * tvm.runtime.DataType(p["dtype"]).bits // 8
            total += nbytes * (active if ".experts." in p["name"] else 1.0)
    return int(total)


def decode_step_bytes(runner: Any, batch: int, prompt: int, new: int) -> int:
    """Bytes a decode step of `batch` sequences must read, each decoding `new` tokens after a
    `prompt`-token prompt: the weights (decode_weight_bytes) and each sequence's K/V at its mean
    length over those steps, prompt + new / 2."""
    kv = batch * (prompt + new // 2) * runner.kv_bytes_per_token
    return decode_weight_bytes(runner, batch) + kv


def matmul_flops_per_token(config: dict[str, Any]) -> float:
    """2 x the multiply-adds of every projection a token goes through (MoE: the active
    experts), LM head included; attention scores are added per prompt length."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * d
    experts = config.get("num_experts_per_tok") or 1
    per_layer = h * (h + 2 * kv) + h * h + experts * 3 * h * i
    if config.get("num_local_experts"):
        per_layer += h * config["num_local_experts"]  # the router
    return 2.0 * (config["num_hidden_layers"] * per_layer + h * v)


def prefill_flops(config: dict[str, Any], n: int) -> float:
    """FLOPs of a causal prefill of n tokens: projections plus QK^T and PV over the causal
    half of the n x n scores."""
    layers, h = config["num_hidden_layers"], config["hidden_size"]
    return matmul_flops_per_token(config) * n + layers * 2 * 2 * h * n * n / 2


def run(
    path: str | Path,
    device: str,
    *,
    devices: list[str] | None = None,
    gemm_flops: float | None = None,
    batches: tuple[int, ...] = (8, 32, 64, 128),
    prefills: tuple[int, ...] = (512, 2048),
    step_graphs: bool | None = None,
    say: Any = print,
) -> Report:
    start = time.perf_counter()
    biggest = max((*batches, 1))
    context = 512 + 128
    engine = Engine(
        path, device, devices=devices, max_batch_size=biggest,
        kv_tokens=biggest * context + 4096, prefill_chunk=max((*prefills, 2048)),
        prefix_cache=False, step_graphs=step_graphs,
    )  # fmt: skip
    load = time.perf_counter() - start
    with engine:  # closing it stops a tensor-parallel run's workers, also on an error
        return _measure(engine, load, gemm_flops, batches, prefills, say)


def _measure(
    engine: Engine,
    load: float,
    gemm_flops: float | None,
    batches: tuple[int, ...],
    prefills: tuple[int, ...],
    say: Any,
) -> Report:
    runner = engine.runner
    names = ", ".join(str(d) for d in runner.executor.devices)
    report = Report(
        names, copy_bandwidth(runner.device), gemm_flops, tensor_parallel=runner.tensor_parallel
    )
    report.add("load", load, "s")
    say(report.text())
    config = runner.config
    ranks = runner.tensor_parallel
    # Seconds of all-reduce per token (none on one GPU): 2 per layer of the hidden state.
    reduce_per_token = 0.0
    if ranks > 1:
        dtype = runner.manifest.model_dtype
        bus = report.allreduce_bandwidth = allreduce_bandwidth(runner.executor.session, dtype)
        say(f"all-reduce bus bandwidth: {bus / 1e9:.0f} GB/s (256 MB over {ranks} GPUs)")
        itemsize = tvm.runtime.DataType(dtype).bits // 8
        volume = 2 * config["num_hidden_layers"] * config["hidden_size"] * itemsize
        reduce_per_token = volume * 2 * (ranks - 1) / ranks / bus
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return [1, *rng.integers(3, runner.vocab_size, n - 1).tolist()]

    def figure(*args: Any, **kwargs: Any) -> None:
        report.add(*args, **kwargs)
        say(report.figures[-1].line())

    # Warm up every entry point once (first calls load kernels).
    engine.generate([prompt(16), prompt(16)], max_tokens=4, **GREEDY)
    report.finite_logits = finite_logits(runner, prompt(16))
    if not report.finite_logits:
        say(NOT_FINITE)

    # Decode, batch 1: 128-token prompt, 256 new tokens. With whole-step graphs, a request of
    # the same lengths first captures them (a server's later requests find them).
    if runner.step_graphs is not None:
        engine.submit(prompt(128), max_tokens=256, **GREEDY).result()
    handle = engine.submit(prompt(128), max_tokens=256, **GREEDY)
    t0 = time.perf_counter()
    first = None
    for _ in handle.deltas():
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    step_bytes = decode_step_bytes(runner, 1, 128, 256)
    figure("decode tokens/s, batch 1", 255 / (end - first), "tok/s",
           1 / (step_bytes / report.bandwidth + reduce_per_token))  # fmt: skip
    figure("time to first token, 128 tokens", 1e3 * (first - t0), "ms")
    stats = engine.stats
    figure("host share of a step, batch 1", 100 * stats.host_ms / stats.step_ms, "%")

    for n in prefills:
        if n >= engine.context_length:
            say(f"prefill of {n} tokens: skipped, the context holds {engine.context_length}")
            continue

        def once(n: int = n) -> float:
            t0 = time.perf_counter()
            engine.submit(prompt(n), max_tokens=1, **GREEDY).result()
            return time.perf_counter() - t0

        once()  # warm-up (see the module docstring)
        seconds = min(once() for _ in range(3))
        roof = None
        if report.gemm_flops:
            per_token = prefill_flops(config, n) / n / (ranks * report.gemm_flops)
            roof = 1 / (per_token + reduce_per_token)
        figure(f"prefill tokens/s, {n} tokens", n / seconds, "tok/s", roof)
        figure(f"time to first token, {n} tokens", 1e3 * seconds, "ms")

    # 512-token prompts and 128 new tokens (shorter prompts where the context is shorter)
    length = min(512, engine.context_length - 128)
    for batch in batches:
        # the batch size's CUDA graphs captured first, as a server's later steps find them
        runner.warm_batch_graphs([engine.new_seq_id() for _ in range(batch)])
        rate = batched_decode(engine, [prompt(length) for _ in range(batch)], 128)
        step_bytes = decode_step_bytes(runner, batch, length, 128)
        step_seconds = step_bytes / report.bandwidth + batch * reduce_per_token
        figure(f"decode tokens/s, batch {batch} ({length}+128)", rate, "tok/s",
               batch / step_seconds)  # fmt: skip
    return report


def allreduce_bandwidth(session: Any, dtype: str, nbytes: int = 1 << 28, reps: int = 10) -> float:
    """Bus bandwidth (bytes/s, as nccl-tests counts it) of an in-place all-reduce of `nbytes`
    over the session's workers."""
    ranks = int(session.num_workers)
    itemsize = tvm.runtime.DataType(dtype).bits // 8
    buf = session.empty((nbytes // itemsize,), dtype)
    session.allreduce(buf, buf)  # warm-up: NCCL sets up its channels on first use
    session.sync_worker_0()
    start = time.perf_counter()
    for _ in range(reps):
        session.allreduce(buf, buf)
    session.sync_worker_0()  # an all-reduce ends on every worker together
    seconds = (time.perf_counter() - start) / reps
    return nbytes * 2 * (ranks - 1) / ranks / seconds


def batched_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s over the steps in which every request decodes (none prefills)."""
    handles = [engine.submit(p, max_tokens=new_tokens, **GREEDY) for p in prompts]
    seconds = tokens = 0.0
    more = True
    while more:
        before = engine.stats
        t0 = time.perf_counter()
        more = engine.step()
        dt = time.perf_counter() - t0
        after = engine.stats
        decoded = after.decode_tokens - before.decode_tokens
        # Every request decodes once per pass, and a step may run several (Engine.decode_steps).
        whole = decoded > 0 and decoded % len(prompts) == 0
        if after.prefill_tokens == before.prefill_tokens and whole:
            seconds += dt
            tokens += decoded
    for h in handles:
        h.result()
    if not seconds:
        raise KilnError(
            f"no step decoded all {len(prompts)} requests at once: the first finished their "
            f"{new_tokens} tokens before the last were prefilled; measure fewer requests, or "
            "prefill in larger chunks (run()'s: its largest prefill length, 2048 at least)"
        )
    return tokens / seconds
