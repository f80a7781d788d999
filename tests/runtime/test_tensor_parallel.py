"""Tensor parallelism behind the Runner: an artifact run over a TVM Disco session gives what it
gives on one device. No GPU: the sessions here are CPU threads whose collectives run in Python
(tests/disco_cpu.py), which run a tensor-parallel CPU build (kiln compile --tensor-parallel 2),
or broadcast an unsharded artifact to two workers, through the same executor as NCCL's GPUs."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest
import tvm
import tvm_ffi
from click.testing import CliRunner
from disco_cpu import cpu_session, open_cpu_session

import kiln
from kiln.compiler.cli import main
from kiln.runtime import executor
from kiln.runtime.artifact import Manifest
from kiln.runtime.benchmark import decode_weight_bytes
from kiln.runtime.disco import executor as disco_executor
from kiln.runtime.disco import nccl
from kiln.runtime.errors import KilnError
from kiln.runtime.runner import Runner
from kiln.runtime.safetensors import load_safetensors

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llama(artifact):
    return artifact("llama")


@pytest.fixture(scope="module")
def llama_tp2(checkpoint, tmp_path_factory):
    """The same checkpoint sharded over two ranks, for the CPU."""
    out = tmp_path_factory.mktemp("art-llama-tp2") / "artifact"
    return kiln.compile(
        str(checkpoint("llama")), target="cpu", quantization="q0f32", output=out,
        tensor_parallel=2,
    )  # fmt: skip


@pytest.fixture
def session():
    with cpu_session(2) as sess:
        yield sess


def prompt(seed: int, n: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 320, n - 1).tolist()]


def passes(runner: Runner) -> tuple[list[np.ndarray], list[int]]:
    """Every kind of pass: a ragged prefill of two sequences (last and every token's logits),
    greedy decodes at batch 2 and 1, a forked sequence's, and both sampling kernels. Returns
    the logits of each (on the host), and the sampled ids and free pages."""
    kv = runner.kv
    for seq in (0, 1, 2):
        kv.add(seq)
    out = [runner.prefill([0, 1], [prompt(0, 21), prompt(1, 7)])]
    out.append(runner.prefill([2], [prompt(2, 9)], all_logits=True))
    for _ in range(6):
        out.append(runner.decode([0, 1], out[-1][-2:].argmax(-1).tolist()))
    for _ in range(3):
        out.append(runner.decode([2], out[-1][-1:].argmax(-1).tolist()))
    kv.fork(2, 3, 8)
    out.append(runner.decode([3], [9]))
    logits = runner.decode([0, 1], [5, 6], on_device=True)
    out.append(logits.numpy())
    ids = logits.greedy() + logits.sample([0.8, 1.2], [0.9, 1.0], [0, 7], [0.25, 0.75])
    return out, [*ids, kv.free_pages()]


def test_the_python_backend_runs_disco_collectives(session):
    parts = session.scatter(np.arange(6, dtype="float32").reshape(2, 3))
    total = session.empty((3,), "float32")
    session.allreduce(parts, total, "sum")
    copy = session.broadcast(np.arange(4, dtype="int32"))
    for rank in range(2):
        assert parts.debug_get_from_remote(rank).numpy().tolist() == [3 * rank, 3 * rank + 1,
                                                                      3 * rank + 2]  # fmt: skip
        assert total.debug_get_from_remote(rank).numpy().tolist() == [3, 5, 7]
        assert copy.debug_get_from_remote(rank).numpy().tolist() == [0, 1, 2, 3]


def test_an_artifact_over_two_workers_equals_it_run_here(llama, session):
    """An unsharded artifact broadcast to two Disco workers: the same numbers as the local VM
    (the same code on the same CPU), through every pass and the KV cache's bookkeeping."""
    here, here_ids = passes(Runner(llama, max_batch_size=4, kv_tokens=256))
    with Runner(llama, session=session, max_batch_size=4, kv_tokens=256) as runner:
        assert runner.tensor_parallel == 1 and runner.executor.workers == 2
        there, there_ids = passes(runner)
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    assert there_ids == here_ids


def run_engine(engine: kiln.Engine) -> list[list[int]]:
    """Requests that share a prompt prefix (forks from the prefix cache), greedy and sampled,
    submitted while others run."""
    shared = prompt(3, 40)
    handles = [engine.submit([*shared, 7, 8], max_tokens=12, **GREEDY)]
    for _ in range(3):
        engine.step()
    handles += [
        engine.submit(shared + prompt(4 + i, 6)[1:], max_tokens=10 + i, **GREEDY) for i in range(3)
    ]
    handles.append(engine.submit(prompt(9, 30), max_tokens=9, temperature=0.9, top_p=0.9, seed=5))
    engine.run_until_idle()
    assert engine.stats.cached_tokens > 0
    return [h.result().token_ids for h in handles]


def test_the_engine_over_disco_equals_the_engine_here(llama, session):
    with kiln.Engine(llama, max_batch_size=4, kv_tokens=512) as engine:
        here = run_engine(engine)
    with kiln.Engine(llama, session=session, max_batch_size=4, kv_tokens=512) as engine:
        assert run_engine(engine) == here
    # Greedy passes in a row (the CPU's default is one a step), here and over Disco
    for where in ({}, {"session": session}):
        with kiln.Engine(llama, max_batch_size=4, kv_tokens=512, decode_steps=4, **where) as e:
            assert run_engine(e) == here


def test_a_tensor_parallel_build_equals_the_unsharded_one(llama, llama_tp2, session):
    """kiln compile --tensor-parallel 2 for the CPU: each rank holds half the heads and half the
    MLP and all-reduces; the logits equal the one-device build's within float32 rounding, and
    the engine's tokens are the same."""
    manifest = json.loads((llama_tp2 / "manifest.json").read_text())
    assert manifest["tensor_parallel"] == 2 and manifest["kv_cache"]["num_kv_heads"] == 1
    here, here_ids = passes(Runner(llama, max_batch_size=4, kv_tokens=256))
    with Runner(llama_tp2, session=session, max_batch_size=4, kv_tokens=256) as runner:
        there, there_ids = passes(runner)
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert there_ids == here_ids
    with kiln.Engine(llama, max_batch_size=4, kv_tokens=512) as engine:
        expected = run_engine(engine)
    with kiln.Engine(llama_tp2, session=session, max_batch_size=4, kv_tokens=512) as engine:
        assert run_engine(engine) == expected


def test_a_tensor_parallel_mixtral_equals_the_unsharded_one(artifact, checkpoint, tmp_path):
    """Mixtral's experts each split like an MLP; the compiler joins each expert's gate and up
    (kiln.passes.combine_parallel_matmul), so each rank's joined weight holds its share of both:
    a ragged prefill's logits equal the one-device build's within float32 rounding."""
    two = kiln.compile(
        str(checkpoint("mixtral")), target="cpu", quantization="q0f32", output=tmp_path / "tp2",
        tensor_parallel=2,
    )  # fmt: skip
    ids = [prompt(3, 20), prompt(4, 6)]
    runner = Runner(artifact("mixtral"), max_batch_size=2, kv_tokens=128)
    for seq in (0, 1):
        runner.kv.add(seq)
    here = runner.prefill([0, 1], ids, all_logits=True)
    with cpu_session(2) as session, Runner(two, session=session, max_batch_size=2,
                                           kv_tokens=128) as sharded:  # fmt: skip
        for seq in (0, 1):
            sharded.kv.add(seq)
        there = sharded.prefill([0, 1], ids, all_logits=True)
    np.testing.assert_allclose(there, here, rtol=1e-4, atol=1e-4 * np.abs(here).max())


def as_cuda_build(art, tmp_path):
    """A copy of a CPU build whose manifest says cuda: the runner then takes a GPU's path."""
    copy = tmp_path / "as-cuda"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_tensor_parallel_model_takes_its_gpus_and_lets_go_of_them(
    llama, llama_tp2, tmp_path, monkeypatch
):
    """The path of kiln.load(tp2, device="cuda") on a machine with two GPUs, the CPU standing in
    for them and a CPU session for NCCL's: it opens a session on cuda:0 and cuda:1, samples with
    the artifact's kernels on the workers, and closing the model leaves no handle into the
    session, which TVM then shuts down (here the test still holds it, and does)."""
    opened = []

    def fake_nccl_session(devices):
        assert devices == [0, 1]
        opened.append(open_cpu_session(2))
        return opened[-1]

    monkeypatch.setattr(nccl, "nccl_session", fake_nccl_session)
    monkeypatch.setattr(executor, "device_count", lambda kind: 2)
    monkeypatch.setattr(executor, "open_device", lambda name: tvm.cpu())
    ids = prompt(11, 20)
    sampled = {"max_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 1}
    with kiln.load(llama, context_length=128) as model:
        model.runner.samples_on_device = True  # the kernels, as on a GPU
        greedy = model.generate_ids(ids, max_tokens=12, **GREEDY)
        drawn = model.generate_ids(ids, **sampled)
    try:
        cuda_build = as_cuda_build(llama_tp2, tmp_path)
        with kiln.load(cuda_build, device="cuda", context_length=128) as model:
            assert model.runner.samples_on_device and model.runner.executor.workers == 2
            assert model.generate_ids(ids, max_tokens=12, **GREEDY) == greedy
            assert model.generate_ids(ids, **sampled) == drawn
        assert len(opened) == 1
        use_count = tvm_ffi.get_global_func("testing.object_use_count")
        assert use_count(opened[0]) == 1  # this test's reference, no other C++ one
        # nor a Python one (a closure holding the session's Python object counts once above)
        assert [r for r in gc.get_referrers(opened[0]) if r is not opened] == []
        model.close()  # again: nothing left to let go of
    finally:
        for session in opened:
            session.shutdown()


def test_every_worker_loads_the_artifacts_externs(llama, session, tmp_path, monkeypatch):
    """A CUDA artifact's cuBLAS extern must be registered in each worker's process too: the
    controller loads it first (a failure there is reported; in a worker it would abort), then
    every worker does, through the session."""
    copy = tmp_path / "with-extern"
    shutil.copytree(llama, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["externs"] = ["kiln.test.extern"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loaded = []
    monkeypatch.setattr(disco_executor, "load_externs", lambda m: loaded.append(m.root))
    with Runner(copy, session=session, kv_tokens=64):
        # Here, then on each worker (the weights' broadcasts after it wait for both).
        assert loaded == [copy] * 3


# -- what cannot run, and why --------------------------------------------------------------


def fake_manifest(tmp_path, ranks: int = 2, device: str = "cuda") -> Manifest:
    """Enough of a manifest for the runner to choose where it runs (and refuse)."""
    return Manifest(tmp_path, {"tensor_parallel": ranks, "target": {"device": device}})


@pytest.mark.parametrize(
    "ranks,kind,device,devices,gpus,message",
    [
        (2, "cuda", "cuda", None, 0, "this machine has no GPUs"),
        (2, "cuda", "cuda", None, 1, "this machine has 1 GPU that TVM can use"),
        (4, "cuda", "cuda", None, 3, "or compile it with --tensor-parallel 3"),
        (2, "cuda", "cuda", ["cuda:0", "cuda:5"], 4, "name GPUs that exist (cuda:0..cuda:3)"),
        (2, "cuda", "cuda", ["cuda:0"], 2, "compiled to run on 2 devices, but 1 was given"),
        (2, "cuda", "cuda", ["cuda:0", "cuda:1", "cuda:2"], 4, "--tensor-parallel 3"),
        (2, "cuda", "cuda", ["cuda:1", "cuda:1"], 2, "devices names cuda:1 twice"),
        (2, "cuda", "cuda", ["cuda:0", "cpu"], 2, "compiled for cuda, not cpu"),
        (2, "cuda", "cpu", None, 2, "compiled for cuda, not cpu"),
        (2, "cuda", "cuda:1", None, 2, "name them with devices=[...]"),
        (2, "cpu", "cpu", None, 0, "runs only in a Disco session"),
        (2, "rocm", "rocm", None, 2, "tensor parallelism on NVIDIA GPUs (NCCL) only"),
        (1, "cuda", "cuda", ["cuda:0", "cuda:1"], 2, "compiled to run on 1 device"),
        (2, "cuda", "cuda", ["gpu:0", "gpu:1"], 2, "unknown device 'gpu:0'"),
    ],
)
def test_devices_that_do_not_fit_are_refused(
    ranks, kind, device, devices, gpus, message, tmp_path, monkeypatch
):
    monkeypatch.setattr(executor, "device_count", lambda _kind: gpus)
    with pytest.raises(KilnError) as e:
        Runner(fake_manifest(tmp_path, ranks, kind), device, devices=devices)
    assert message in str(e.value)


def test_a_session_of_the_wrong_size_is_refused(llama_tp2):
    with cpu_session(3) as sess, pytest.raises(KilnError, match="the Disco session has 3 workers"):
        Runner(llama_tp2, session=sess)


def test_a_cpu_tensor_parallel_build_needs_a_session(llama_tp2):
    with pytest.raises(KilnError, match="without --tensor-parallel to run it here"):
        Runner(llama_tp2)


def test_the_cli_names_the_mismatch(llama, llama_tp2):
    result = CliRunner().invoke(main, ["run", str(llama), "-p", "hi", "--tensor-parallel", "2"])
    assert result.exit_code == 1
    assert "error:" in result.output and "compiled to run on 1 device, but 2" in result.output
    result = CliRunner().invoke(main, ["bench", str(llama_tp2), "--tensor-parallel", "2"])
    assert result.exit_code == 1 and "tensor-parallel build for the CPU" in result.output


def test_param_files_name_one_file_per_rank(tmp_path):
    manifest = fake_manifest(tmp_path)
    entry = {"name": "w", "files": ["params/rank-0/a.safetensors", "params/rank-1/a.safetensors"]}
    assert manifest.param_files(entry) == entry["files"]
    with pytest.raises(KilnError, match="lists 1 files for w, one per GPU of 2"):
        manifest.param_files({"name": "w", "file": "params/a.safetensors"})
    one = Manifest(tmp_path, {"target": {"device": "cpu"}})
    assert one.tensor_parallel == 1
    single = {"name": "w", "file": "params/a.safetensors"}
    assert one.param_files(single) == ["params/a.safetensors"]


def test_decode_bytes_of_a_tensor_parallel_build_are_one_gpus(llama_tp2):
    """The roofline counts what one GPU reads: its own shard, from the manifest alone."""
    manifest = executor.Manifest(llama_tp2, json.loads((llama_tp2 / "manifest.json").read_text()))
    rank0 = {}
    for entry in manifest.params:
        rank0 |= load_safetensors(llama_tp2 / manifest.param_files(entry)[0])
    shard = sum(a.nbytes for n, a in rank0.items() if not n.startswith("embed_tokens."))
    assert decode_weight_bytes(manifest) == shard
