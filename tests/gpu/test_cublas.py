"""Kiln's cuBLAS extern on a real GPU: `kiln.cublas.matmul` against NumPy (odd sizes, a few
rows, bf16, a float32 result, unaligned operands), on TVM's current stream, and a CUDA artifact
whose prefill and batched decode run their GEMMs on it against transformers.

The extern library comes from the cache ($KILN_CACHE/cublas, built where TVM's headers are:
`python -m kiln.runtime.cublas`), cuBLASLt from this machine ($KILN_CUBLAS, pip's CUDA 13 one,
the CUDA toolkit's, or the CUDA 12 one torch brings). Results are recorded in
tests/gpu/RESULTS.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
import tvm_ffi

from kiln.runtime.cublas import cublas_library, load_cublas
from kiln.runtime.device import open_device
from kiln.runtime.runner import Runner

pytestmark = pytest.mark.gpu

FP16_BOUND = 2e-2  # as in test_cuda.py: max logits error relative to their largest magnitude


@pytest.fixture(scope="module")
def matmul():
    dev = open_device("cuda:0")  # TVM's CUDA runtime before the extern (it shares libcudart)
    version = load_cublas()
    print(f"\ncuBLASLt {version} from {cublas_library()}")
    return dev, tvm_ffi.get_global_func("kiln.cublas.matmul")


def _bf16():
    return pytest.importorskip("ml_dtypes").bfloat16


# (x shape, n): k not a multiple of 8, odd n, 1-3 rows, batched decode rows, zero rows
SHAPES = [
    ((1, 1, 64), 96),
    ((1, 2, 37), 19),
    ((1, 3, 130), 258),
    ((4, 1, 256), 512),
    ((1, 45, 4096), 1024),
    ((1, 0, 64), 32),
]


@pytest.mark.parametrize("x_shape,n", SHAPES)
@pytest.mark.parametrize("dtype,out_dtype", [("float16", "float16"), ("float16", "float32"),
                                             ("bfloat16", "bfloat16")])  # fmt: skip
def test_matmul_equals_numpy(matmul, x_shape, n, dtype, out_dtype):
    dev, f = matmul
    np_dtype = _bf16() if dtype == "bfloat16" else dtype
    np_out = _bf16() if out_dtype == "bfloat16" else out_dtype
    rng = np.random.default_rng(sum(x_shape) + n)
    k = x_shape[-1]
    x = rng.normal(0, 1, x_shape).astype(np_dtype)
    w = (rng.normal(0, 1, (n, k)) * k**-0.5).astype(np_dtype)
    out = tvm.runtime.tensor(np.full((*x_shape[:-1], n), np.nan, np_out), dev)
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), out)
    got = out.numpy().astype("float32")
    expect = x.astype("float64") @ w.astype("float64").T
    # fp32 accumulation, then one rounding to the output type
    rtol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}[out_dtype]
    np.testing.assert_allclose(
        got, expect, rtol=rtol, atol=rtol * (np.abs(expect).max(initial=0) + 1)
    )


def test_unaligned_operands(matmul):
    """Views 2 bytes into their buffers (cuBLASLt must not assume 16-byte alignment)."""
    dev, f = matmul
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 1 + 3 * 40).astype("float16")
    w = rng.normal(0, 0.2, 1 + 24 * 40).astype("float16")
    x_dev, w_dev = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
    out = tvm.runtime.tensor(np.zeros(1 + 3 * 24, "float16"), dev)
    f(
        x_dev._create_view((1, 3, 40), "float16", relative_byte_offset=2),
        w_dev._create_view((24, 40), "float16", relative_byte_offset=2),
        out._create_view((1, 3, 24), "float16", relative_byte_offset=2),
    )
    expect = x[1:].reshape(3, 40).astype("float64") @ w[1:].reshape(24, 40).astype("float64").T
    got = out.numpy()[1:].reshape(3, 24).astype("float32")
    np.testing.assert_allclose(got, expect, rtol=2e-3, atol=2e-3 * np.abs(expect).max())


def test_runs_on_tvms_current_stream(matmul):
    """On a torch stream set as TVM's current one, after a long kernel on that stream that
    writes x: run on any other stream, the GEMM would read x before it is written."""
    torch = pytest.importorskip("torch")
    _, f = matmul
    rng = np.random.default_rng(2)
    src = torch.tensor(rng.normal(0, 1, (1, 512, 1024)), dtype=torch.float16, device="cuda")
    w = torch.tensor(rng.normal(0, 0.03, (768, 1024)), dtype=torch.float16, device="cuda")
    x = torch.zeros_like(src)
    out = torch.zeros((1, 512, 768), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on `stream`
        x.copy_(src)
        f(x, w, out)
    stream.synchronize()
    expect = (src.float() @ w.float().T).cpu().numpy()
    np.testing.assert_allclose(out.float().cpu().numpy(), expect, rtol=2e-3, atol=2e-2)


def test_artifact_runs_prefill_and_batched_decode_on_cublas(gpu_build):
    """The fp16 artifact lists the extern (beside Kiln's batch-1 SwiGLU and norm externs), loads
    it, and its logits equal transformers' for prefills of 1, 2, 3 and 45 tokens (symbolic rows)
    and for a batched decode step."""
    import torch
    import transformers

    ckpt, art = gpu_build("llama", "q0f16")
    externs = json.loads((art / "manifest.json").read_text())["target"]["externs"]
    assert "kiln.cublas.matmul" in externs
    assert all(e.startswith("kiln.gemv.") for e in externs if e != "kiln.cublas.matmul")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()
    runner = Runner(art, "cuda", max_batch_size=4, kv_tokens=512)
    assert tvm_ffi.get_global_func("kiln.cublas.version")() >= 120000
    rng = np.random.default_rng(5)
    prompts = [[1, *rng.integers(3, runner.vocab_size, n - 1).tolist()] for n in (1, 2, 3, 45)]

    def theirs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].numpy()

    def rel_err(ours: np.ndarray, expect: np.ndarray) -> float:
        return float(np.abs(ours - expect).max() / np.abs(expect).max())

    for seq, ids in enumerate(prompts):
        runner.kv.add(seq)
        err = rel_err(runner.prefill([seq], [ids], all_logits=True), theirs(ids))
        print(f"prefill of {len(ids)} tokens: max rel err {err:.2e}")
        assert err <= FP16_BOUND
    tokens = [11, 22, 33, 44]
    batched = runner.decode(list(range(len(prompts))), tokens)  # the `decode` entry: cuBLAS
    for seq, (ids, token) in enumerate(zip(prompts, tokens, strict=True)):
        err = rel_err(batched[seq], theirs([*ids, token])[-1])
        print(f"batched decode, sequence {seq}: max rel err {err:.2e}")
        assert err <= FP16_BOUND
        runner.kv.remove(seq)
