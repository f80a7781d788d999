"""CUDA artifacts on a real GPU against transformers on the same weights.

Artifacts come from `tests/gpu/build_artifacts.py` (KILN_GPU_ARTIFACTS names their folder), so
the GPU machine needs only the TVM runtime; without that variable they are compiled here.
Results of each run are recorded in tests/gpu/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from greedy_checks import planted_logits
from step_graph_checks import check_step_graphs

import kiln
from kiln.runtime import gemv
from kiln.runtime.engine import DECODE_STEPS

pytestmark = pytest.mark.gpu

FAMILIES = ["llama", "llama3", "llama_linear", "mistral", "mixtral"]
# fp16 weights and activations against the fp32 reference: the logits' max error relative to
# their largest magnitude. Measured values are printed and recorded in RESULTS.md.
FP16_BOUND = 2e-2
PROMPT_LEN = 45


def reference(ckpt: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()


def prompt(seed: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 320, PROMPT_LEN - 1).tolist()]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_fp16_matches_transformers(name, gpu_build):
    import torch

    ckpt, art = gpu_build(name, "q0f16")
    model = kiln.load(art, device="cuda")
    ref = reference(ckpt)
    ids = prompt(0)
    ours = model.prefill_logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    err = rel_err(ours, theirs)
    print(f"\n{name} q0f16 cuda: prefill logits max rel err {err:.2e}")
    assert err <= FP16_BOUND

    # Greedy decoding: 16 tokens. fp16 rounding may flip a near-tie between the top two logits
    # (the fp32 reference on the same prefix then has them within the fp16 error measured
    # above); any other difference fails.
    _check_greedy(model, ref, ids, f"{name} q0f16")


QUANTIZED = (
    [(name, "q4f16") for name in FAMILIES]
    + [(name, "fp8e4m3") for name in FAMILIES]
    + [("llama", "q4f16_awq"), ("mixtral", "q4f16_awq")]
)


@pytest.mark.parametrize("name,preset", QUANTIZED)
def test_cuda_quantized_matches_transformers_on_dequantized_weights(name, preset, gpu_build):
    """Packed weights (int4, fp8, AutoAWQ's int4 with zero points) read by the kernels: the
    logits equal transformers running the artifact's own weights, dequantized, within fp16
    rounding."""
    import torch

    _, art = gpu_build(name, preset)
    root = os.environ.get("KILN_GPU_ARTIFACTS")
    if not root:
        pytest.skip("the dequantized reference is built by tests/gpu/build_artifacts.py")
    if (name, preset) == ("mixtral", "q4f16"):  # its batch-1 decode reads the routed experts only
        externs = json.loads((art / "manifest.json").read_text())["target"]["externs"]
        assert {gemv.Q4_MOE_SWIGLU, gemv.Q4_MOE, gemv.MOE_ROUTE} <= set(externs)
    if preset == "q4f16_awq":
        ref = reference(Path(root) / f"ckpt-{name}-awq" / "plain")
    else:
        ref = reference(Path(root) / f"ckpt-{name}-{preset}-dequantized")
    ids = prompt(2)
    ours = kiln.load(art, device="cuda").prefill_logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    err = rel_err(ours, theirs)
    print(f"\n{name} {preset} cuda: logits max rel err vs dequantized transformers {err:.2e}")
    assert err <= FP16_BOUND
    _check_greedy(kiln.load(art, device="cuda"), ref, ids, f"{name} {preset}")
    for batch in (11, 20):
        _check_batched_decode(art, ref, f"{name} {preset}", batch)


def _check_batched_decode(art: Path, ref, what: str, batch: int) -> None:
    """One decode step of `batch` sequences together (the batched decode: q4f16's int4 GEMVs
    take 8 sequences a kernel, so 11 is one full and one partial; 20, more than the GEMVs take,
    runs the int4 GEMM kernel) after prompts of different lengths: each row's logits against
    the reference on its own sequence."""
    import torch

    from kiln.runtime.runner import Runner

    rng = np.random.default_rng(9)
    prompts = [[1, *rng.integers(3, 320, 4 + 3 * (i % 16)).tolist()] for i in range(batch)]
    kv_tokens = max(2048, sum(len(ids) + 32 for ids in prompts))  # a page or two of slack each
    runner = Runner(art, "cuda", max_batch_size=batch, kv_tokens=kv_tokens)
    for seq, ids in enumerate(prompts):
        runner.kv.add(seq)
        step = runner.sequence_chunk  # a sliding-window model's prefill chunks fit the window
        for start in range(0, len(ids), step):
            runner.prefill([seq], [ids[start : start + step]])
    tokens = rng.integers(3, 320, batch).tolist()
    rows = runner.decode(list(range(batch)), tokens)
    worst = 0.0
    for ids, token, row in zip(prompts, tokens, rows, strict=True):
        with torch.no_grad():
            theirs = ref(torch.tensor([[*ids, token]])).logits[0, -1].numpy()
        worst = max(worst, rel_err(row, theirs))
    print(f"{what} cuda: a decode of {batch} sequences, max rel err {worst:.2e}")
    assert worst <= FP16_BOUND


@pytest.mark.parametrize("vocab", [128256, 70001])
def test_greedy_of_a_large_vocabulary_on_cuda(vocab, tmp_path):
    """The greedy sampler past kiln.compiler.sampling.CHUNKED_FROM (an argmax in chunks: 32 of
    4,008 for Llama-3's 128,256; 18 of 4,096 for 70,001, the last padded), built alone
    (build_artifacts.py --sampling-only), on 64 rows: NumPy's argmax, with ties across chunks, at
    a chunk's edge and within one, the last id, and a row of -inf (0)."""
    import tvm
    from tvm.runtime import vm  # (the runtime's: the GPU machine may have no tvm.relax)

    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")
    if prebuilt:
        library = Path(prebuilt) / f"greedy-{vocab}.so"
        if not library.is_file():
            pytest.fail(f"{library} is missing: run tests/gpu/build_artifacts.py again")
    else:
        from build_artifacts import build_sampling

        build_sampling(tmp_path, "sm_90")
        library = tmp_path / f"greedy-{vocab}.so"
    from kiln.runtime.device import open_device

    device = open_device("cuda:0")  # (loads TVM's CUDA runtime, which the library's kernels need)
    machine = vm.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    logits = planted_logits(64, vocab, 4008 if vocab == 128256 else 4096, seed=4)
    got = machine["greedy"](tvm.runtime.tensor(logits, device)).numpy()
    assert got.tolist() == np.argmax(logits, axis=1).tolist()


def test_batched_int4_decode_of_wide_layers_matches_transformers(gpu_build):
    """llama-wide (hidden and intermediate sizes 256: K % 128 == 0, where the tiny families have
    64), whose batched decode on a Hopper GPU runs its int4 Linears on the warpgroup MMAs
    (Q4Wgmma: 9 to 128 sequences in one kernel; elsewhere the mma.sync kernel and, past 64,
    cuBLAS): one step of 12, 40 and 100 sequences against transformers on the artifact's own
    weights, dequantized."""
    root = os.environ.get("KILN_GPU_ARTIFACTS")
    if not root:
        pytest.skip("the dequantized reference is built by tests/gpu/build_artifacts.py")
    _, art = gpu_build("llama-wide", "q4f16")
    ref = reference(Path(root) / "ckpt-llama-wide-q4f16-dequantized")
    for batch in (12, 40, 100):
        _check_batched_decode(art, ref, "llama-wide q4f16", batch)


@pytest.mark.parametrize("preset", ["q4f16", "q0f16"])
def test_batched_decode_graphs_give_decodes_logits(preset, gpu_build):
    """The batched decode's CUDA graphs (the artifact's batch_graphs entry: Relax's graphs per
    batch size) against decode without them, bit for bit (the same kernels on the same inputs):
    a batch size's first pass (run, then captured), its replays, another size in between, a
    size captured ahead (Runner.warm_batch_graphs), and a batch past the bound, which runs
    decode itself. llama-wide's int4 Linears take the GEMVs at 5 rows and the int4 GEMMs at 40
    and 100 (Q4Wgmma on Hopper); its fp16 ones cuBLAS."""
    from kiln.runtime.runner import Runner

    _, art = gpu_build("llama-wide", preset)
    rng = np.random.default_rng(5)
    bound = 128
    prompts = [[1, *rng.integers(3, 320, 3 + i % 7).tolist()] for i in range(bound + 1)]
    plan = [40, 40, 5, 40, 100, 100, 5, bound + 1, 40]  # sequences 0..n-1 decode a token
    tokens = [rng.integers(3, 320, n).tolist() for n in plan]
    logits = {}
    for graphs in (True, False):
        runner = Runner(art, "cuda", max_batch_size=bound + 1, kv_tokens=(bound + 1) * 64)
        assert runner.batch_graphs is not None and runner.batch_graph_max == bound
        assert runner._decode_entry(bound) is runner.batch_graphs
        assert runner._decode_entry(bound + 1) is runner._decode
        if graphs:
            runner.warm_batch_graphs(list(range(1000, 1100)))  # 100's graphs, ahead
        else:
            runner.batch_graphs = None
        for seq, ids in enumerate(prompts):
            runner.kv.add(seq)
            runner.prefill([seq], [ids])
        logits[graphs] = [
            runner.decode(list(range(n)), t) for n, t in zip(plan, tokens, strict=True)
        ]
        del runner
    for step, (ours, plain) in enumerate(zip(logits[True], logits[False], strict=True)):
        assert np.isfinite(plain).all()
        assert np.array_equal(ours, plain), f"pass {step} ({plan[step]} sequences) differs"


def _check_greedy(model, ref, ids: list[int], what: str, steps: int = 16) -> None:
    """Greedy decoding (the batch-1 decode: its GEMVs, Kiln's int4 ones with the fused SwiGLU
    among them): each token is the reference's best on the same prefix, or within fp16 rounding
    of it (a near-tie between the top two); any other difference fails."""
    import torch

    greedy = model.generate_ids(ids, max_tokens=steps, temperature=0, ignore_eos=True)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids + greedy])).logits[0, len(ids) - 1 : -1].numpy()
    scale = np.abs(ref_logits).max()
    for step, (token, row) in enumerate(zip(greedy, ref_logits, strict=True)):
        gap = (row.max() - row[token]) / scale
        assert gap <= FP16_BOUND, f"step {step}: token {token} is {gap:.2e} below the best"
    agree = sum(int(t == row.argmax()) for t, row in zip(greedy, ref_logits, strict=True))
    print(f"{what} cuda: greedy tokens equal to the reference's argmax: {agree}/{steps}")


def test_cuda_fp32_matches_transformers_tightly(gpu_build):
    import torch

    ckpt, art = gpu_build("llama", "q0f32")
    ours = kiln.load(art, device="cuda").prefill_logits(prompt(1))
    with torch.no_grad():
        theirs = reference(ckpt)(torch.tensor([prompt(1)])).logits[0].numpy()
    err = rel_err(ours, theirs)
    print(f"\nllama q0f32 cuda: prefill logits max rel err {err:.2e}")
    assert err <= 1e-4


def test_loads_with_no_compiler_anywhere(gpu_build, tmp_path):
    """The artifact's kernels are machine code: loading and running it needs neither nvcc nor
    NVRTC (a subprocess with no nvcc on PATH, NVRTC imports refused, and a check that no NVRTC
    or TVM compiler library was ever mapped)."""
    _, art = gpu_build("tiny-llama", "q0f16")
    code = f"""
import importlib.abc, json, sys
class NoNvrtc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        # torch is refused too: a CUDA build of it maps NVRTC itself.
        if name.split(".")[0] in ("cuda", "nvidia", "cupy", "torch") or "nvrtc" in name:
            raise ImportError("NVRTC is not available here")
sys.meta_path.insert(0, NoNvrtc())
import kiln
from kiln.runtime import gemv
m = kiln.load({str(art)!r}, device="cuda")
ids = m.generate_ids([1, 528, 812, 68], max_tokens=12, temperature=0)
maps = open("/proc/self/maps").read()
print(json.dumps({{"ids": ids, "nvrtc": "nvrtc" in maps, "compiler": "libtvm_compiler" in maps}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env.update(PATH="/usr/bin:/bin", TVM_USE_RUNTIME_LIB="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["nvrtc"] and not result["compiler"]
    expect = kiln.load(art, device="cuda").generate_ids(
        [1, 528, 812, 68], max_tokens=12, temperature=0
    )
    assert result["ids"] == expect


def test_nvrtc_built_artifact_runs_like_the_nvcc_one(gpu_build):
    """Kernels compiled with NVRTC and packed by Kiln's own fatbin writer load and give the
    same tokens as the nvcc build."""
    _, nvcc_art = gpu_build("tiny-llama", "q0f16")
    nvrtc_art = nvcc_art.parent / "tiny-llama-q0f16-nvrtc"
    if not os.environ.get("KILN_GPU_ARTIFACTS"):
        pytest.skip("built by tests/gpu/build_artifacts.py")
    ids = [1, 528, 812, 68, 267]
    a = kiln.load(nvcc_art, device="cuda").generate_ids(ids, max_tokens=16, temperature=0)
    b = kiln.load(nvrtc_art, device="cuda").generate_ids(ids, max_tokens=16, temperature=0)
    assert a == b


def test_engine_on_gpu_equals_engine_on_cpu(gpu_build):
    """Continuous batching on the GPU gives the CPU's greedy tokens (fp32 on both): twelve
    requests of different lengths, submitted while others run. The GPU runs its greedy
    decode passes in a row (DECODE_STEPS a step), the CPU one a step."""
    _, cuda_art = gpu_build("llama", "q0f32")
    cpu_art = cuda_art.parent / "llama-q0f32-cpu"
    if not os.environ.get("KILN_GPU_ARTIFACTS"):
        pytest.skip("the CPU artifact is built by tests/gpu/build_artifacts.py")
    rng = np.random.default_rng(7)
    prompts = [[1, *rng.integers(3, 320, int(n)).tolist()] for n in rng.integers(5, 60, 12)]
    outputs, steps = {}, {}
    for device, art in (("cuda", cuda_art), ("cpu", cpu_art)):
        with kiln.Engine(art, device=device, max_batch_size=4) as engine:
            assert engine.decode_steps == (DECODE_STEPS if device == "cuda" else 1)
            handles = []
            for i, ids in enumerate(prompts):
                handles.append(engine.submit(ids, max_tokens=8 + i, temperature=0, ignore_eos=True))
                if i % 3 == 2:
                    engine.step()  # later requests join a running batch
            engine.run_until_idle()
            outputs[device] = [h.result().token_ids for h in handles]
            steps[device] = engine.stats.steps
    assert outputs["cuda"] == outputs["cpu"]
    assert steps["cuda"] < steps["cpu"]  # 20 against 46 where the CPU runs as many


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_whole_step_graphs_give_the_same_tokens(name, gpu_build):
    """kiln.runtime.step_graph on artifacts with TVM's decode attention and Kiln's int4 GEMVs,
    the mixture's routed ones too (tests/step_graph_checks.py; test_attention.py runs it on
    Kiln's attention)."""
    _, art = gpu_build(name, "q4f16")
    check_step_graphs(art, prompt(3))
