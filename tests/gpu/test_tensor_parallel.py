"""Tensor-parallel CUDA artifacts on several GPUs (`kiln compile --tensor-parallel N`, run over a
TVM Disco session with Kiln's NCCL backend: worker 0 in this process, the others processes of
their own) against their unsharded twins on one GPU.

Artifacts: tests/gpu/build_artifacts.py's TENSOR_PARALLEL builds, "NAME-PRESET-tpN" next to
"NAME-PRESET" (llama-wide-q0f16-tp2 and -tp4, llama-wide-q4f16-tp2, mixtral-q0f16-tp2), from
the folder KILN_GPU_ARTIFACTS names; without it they are compiled here. A build needing more
GPUs than the machine has is skipped.

    python tests/gpu/build_artifacts.py OUT_DIR --tensor-parallel-only
    KILN_GPU_ARTIFACTS=OUT_DIR pytest -m gpu tests/gpu/test_tensor_parallel.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_checkpoint
from gpu.build_artifacts import TENSOR_PARALLEL

import kiln
from kiln.compiler.cli import main
from kiln.runtime.device import device_count
from kiln.runtime.errors import KilnError
from kiln.runtime.model import Model

pytestmark = pytest.mark.gpu

# fp16 on both sides, summed in another order: the logits' max error relative to their largest
# magnitude (test_cuda.py's bound against fp32 transformers)
FP16_BOUND = 2e-2
GREEDY = {"temperature": 0, "ignore_eos": True}
SHARDED = [(name, preset, n) for name, _, _, preset, n in TENSOR_PARALLEL if n > 1]
IDS = [f"{name}-{preset}-tp{n}" for name, preset, n in SHARDED]


@pytest.fixture(scope="session")
def tp_build(tmp_path_factory):
    """tp_build(name, preset, n) -> (the unsharded artifact, the one sharded over n GPUs)."""
    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")
    made: dict[tuple[str, str, int], Path] = {}

    def artifact(name: str, preset: str, n: int) -> Path:
        label = f"{name}-{preset}" + (f"-tp{n}" if n > 1 else "")
        if prebuilt:
            return Path(prebuilt) / label
        if (name, preset, n) not in made:
            family, changes = next((f, c) for m, f, c, _, _ in TENSOR_PARALLEL if m == name)
            ckpt = tmp_path_factory.getbasetemp() / f"ckpt-{name}"
            if not ckpt.exists():
                make_checkpoint(family, ckpt, **changes)
            out = tmp_path_factory.mktemp(f"cuda-{label}") / "artifact"
            kiln.compile(str(ckpt), target="cuda", quantization=preset, output=out,
                         arch="sm_90", tensor_parallel=n)  # fmt: skip
            made[name, preset, n] = out
        return made[name, preset, n]

    def get(name: str, preset: str, n: int) -> tuple[Path, Path]:
        if device_count("cuda") < n:
            pytest.skip(f"needs {n} GPUs")
        return artifact(name, preset, 1), artifact(name, preset, n)

    return get


def prompt(seed: int, vocab: int, n: int = 40) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def check_greedy(reference: Model, ids: list[int], ours: list[int], theirs: list[int]) -> None:
    """`ours` are `theirs` (greedy tokens after `ids`), or part where the two tokens are a
    near-tie of the reference's logits on the common prefix, which fp16 rounding may flip."""
    assert len(ours) == len(theirs)
    if ours == theirs:
        return
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    row = reference.prefill_logits(ids + theirs[:k])[-1]
    gap = abs(row[theirs[k]] - row[ours[k]]) / np.abs(row).max()
    assert gap <= FP16_BOUND, f"step {k}: token {ours[k]} is {gap:.2e} from {theirs[k]}"
    print(f"greedy tokens part at step {k}, a near-tie ({gap:.1e})")


@pytest.mark.parametrize("name,preset,n", SHARDED, ids=IDS)
def test_n_gpus_give_one_gpus_logits_and_tokens(name, preset, n, tp_build):
    one_art, sharded_art = tp_build(name, preset, n)
    with kiln.load(one_art, device="cuda") as one, kiln.load(sharded_art, device="cuda") as tp:
        runner = tp.runner
        assert runner.tensor_parallel == n and runner.executor.workers == n
        ids = prompt(0, tp.vocab_size)
        err = rel_err(tp.prefill_logits(ids), one.prefill_logits(ids))
        print(f"\n{name} {preset} on {n} GPUs: prefill logits max rel err {err:.2e}")
        assert err <= FP16_BOUND
        ours = tp.generate_ids(ids, max_tokens=24, **GREEDY)
        check_greedy(one, ids, ours, one.generate_ids(ids, max_tokens=24, **GREEDY))


@pytest.mark.parametrize("name,preset,n", SHARDED, ids=IDS)
def test_the_engine_batches_forks_and_samples_on_n_gpus(name, preset, n, tp_build):
    """Continuous batching, prefix-cache forks and the sampling kernels on the workers: greedy
    requests give the one-GPU engine's tokens, sampled ones run to their length."""
    one_art, sharded_art = tp_build(name, preset, n)
    vocab = 320  # the tiny checkpoints' (tests/conftest.py)
    shared = prompt(1, vocab, 48)
    prompts = [shared + prompt(2 + i, vocab, 9)[1:] for i in range(4)]
    prompts += [prompt(9 + i, vocab) for i in range(3)]

    def run(engine: kiln.Engine) -> list[list[int]]:
        handles = []
        for i, ids in enumerate(prompts):
            handles.append(engine.submit(ids, max_tokens=10 + i, **GREEDY))
            if i % 2:
                engine.step()  # later requests join a running batch
        sampled = [
            engine.submit(prompt(20 + i, vocab), max_tokens=12, temperature=0.8, seed=i)
            for i in range(3)
        ]
        engine.run_until_idle()
        for h in sampled:
            out = h.result()
            assert out.finish_reason == "length" and len(out.token_ids) == 12
        assert engine.stats.cached_tokens > 0
        return [h.result().token_ids for h in handles]

    with kiln.Engine(sharded_art, device="cuda", max_batch_size=4) as engine:
        assert engine.runner.samples_on_device and engine.runner.tensor_parallel == n
        ours = run(engine)
    with kiln.Engine(one_art, device="cuda", max_batch_size=4) as engine:
        theirs = run(engine)
    with kiln.load(one_art, device="cuda") as reference:
        for ids, a, b in zip(prompts, ours, theirs, strict=True):
            check_greedy(reference, ids, a, b)


def _disco_workers() -> set[str]:
    """Pids of this process's children that are Kiln's Disco workers and still run."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        mine = int(stat[1]) == os.getpid() and stat[0] != "Z"  # a zombie has exited
        if mine and b"kiln.runtime.disco.worker" in cmdline:
            found.add(pid)
    return found


def test_closing_the_model_stops_its_worker_processes(tp_build):
    _, sharded_art = tp_build("llama-wide", "q0f16", 2)
    before = _disco_workers()
    model = kiln.load(sharded_art, devices=["cuda:1", "cuda:0"])  # any two, in any order
    assert len(model.generate_ids(prompt(3, model.vocab_size), max_tokens=4, **GREEDY)) == 4
    assert len(_disco_workers() - before) == 1
    model.close()
    deadline = time.monotonic() + 30
    while _disco_workers() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _disco_workers() - before


def test_the_devices_must_be_the_artifacts(tp_build):
    _, sharded_art = tp_build("llama-wide", "q0f16", 2)
    with pytest.raises(KilnError, match="compiled to run on 2 devices, but 1 was given"):
        kiln.load(sharded_art, devices=["cuda:0"])
    with pytest.raises(KilnError, match="names cuda:0 twice"):
        kiln.load(sharded_art, devices=["cuda:0", "cuda:0"])
    result = CliRunner().invoke(
        main, ["run", str(sharded_art), "-p", "Hi", "--tensor-parallel", "1"]
    )
    assert result.exit_code == 1 and "compiled to run on 2 devices" in result.output


def test_kiln_bench_on_two_gpus(tp_build):
    _, sharded_art = tp_build("llama-wide", "q0f16", 2)
    result = CliRunner().invoke(
        main, ["bench", str(sharded_art), "--tensor-parallel", "2", "--batches", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "tensor parallel over 2 GPUs" in result.output
    assert "decode tokens/s, batch 4" in result.output


def test_kiln_serve_on_two_gpus(tp_build, tmp_path):
    """`kiln serve --tensor-parallel 2` as a user starts it: completions over HTTP equal the
    one-GPU engine's greedy tokens, and stopping the server stops its worker processes."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    one_art, sharded_art = tp_build("llama-wide", "q0f16", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.compiler.cli", "serve", str(sharded_art), "--device", "cuda",
           "--tensor-parallel", "2", "--port", str(port)]  # fmt: skip
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        text = "Once upon a time"
        body = json.dumps(
            {"model": sharded_art.name, "prompt": text, "max_tokens": 12, "temperature": 0}
        ).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        log.close()
    assert answer["usage"]["completion_tokens"] >= 1
    with kiln.load(one_art, device="cuda") as one:
        assert answer["choices"][0]["text"] == one.generate(text, max_tokens=12, temperature=0)
