"""The artifact's batch-1 decode and sampling entry points (kiln.compiler.export, .sampling), on
the CPU and (marked gpu) on CUDA: decode_1 against decode, the sampling kernels against a NumPy
reference of the rules they implement, and the engine driving them as it does on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from greedy_checks import planted_logits

import kiln
from kiln.runtime.runner import Logits, Runner


def reference(logits, temperature, top_p, top_k, u, eps: float = 0.0) -> set[int]:
    """The tokens the rules pick in float64 when the two cut-offs (top_p x mass, u x mass) move
    by up to `eps`, which the kernels' float32 running sums can do."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    mass = np.cumsum(p[order])
    k = top_k if 0 < top_k < p.size else p.size
    picks = set()
    for dt in (-eps, 0.0, eps):
        end = min(int(np.searchsorted(mass[:k], top_p * mass[k - 1] + dt, "left")) + 1, k)
        for du in (-eps, 0.0, eps):
            target = u * mass[end - 1] + du
            picks.add(int(order[min(int(np.searchsorted(mass[:end], target, "right")), end - 1)]))
    return picks


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def built(request, artifact, gpu_build) -> tuple[Path, str]:
    """(fp32 llama artifact, device) for each device the kernels run on."""
    if request.param == "cpu":
        return artifact("llama"), "cpu"
    return gpu_build("llama", "q0f32")[1], "cuda"


@pytest.fixture(scope="module")
def runner(built):
    r = Runner(built[0], built[1], max_batch_size=4, kv_tokens=256)
    r.samples_on_device = True  # on the CPU too: the kernels, not the host, pick tokens
    return r


def test_batch_1_decode_equals_batched_decode(runner):
    """decode_1 (static shapes, its own kernels) gives the logits decode gives the same
    sequence in a batch."""
    rng = np.random.default_rng(3)
    prompt = [1, *rng.integers(3, runner.vocab_size, 20).tolist()]
    for seq in (1, 2, 3):
        runner.kv.add(seq)
        runner.prefill([seq], [prompt if seq < 3 else prompt[::-1]])
    alone = runner.decode([1], [7])  # decode_1
    batched = runner.decode([3, 2], [9, 7])  # decode
    for seq in (1, 2, 3):
        runner.kv.remove(seq)
    assert alone.shape == (1, runner.vocab_size)
    err = np.abs(alone[0] - batched[1]).max() / np.abs(batched[1]).max()
    assert err < 1e-5, err
    assert np.abs(batched[0] - batched[1]).max() > 1e-2  # the rows are different sequences


def test_sample_kernel_matches_reference(runner):
    rng = np.random.default_rng(0)
    vocab = runner.vocab_size
    n = 64
    # Peaked and flat rows, every combination of the filters, including top_k 1 and >= vocab.
    logits = (rng.standard_normal((n, vocab)) * rng.choice([0.5, 3.0, 8.0], (n, 1)))
    logits = logits.astype("float32")
    temperature = rng.choice([0.3, 0.7, 1.0, 1.5], n)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.1], n)
    top_k = rng.choice([0, 1, 5, 40, vocab, vocab + 7], n)
    uniform = rng.random(n)
    got = Logits(runner, tvm.runtime.tensor(logits, runner.device)).sample(
        temperature, top_p, top_k, uniform
    )
    exact = 0
    for i in range(n):
        args = (logits[i], temperature[i], top_p[i], top_k[i], uniform[i])
        assert got[i] in reference(*args, eps=1e-5), (i, *args[1:])
        exact += reference(*args) == reference(*args, eps=1e-5)
    assert exact >= n - 2  # almost every row is far from a cut-off: the check bites


def test_sample_kernel_draws_the_distribution(runner):
    """Many uniforms over one small-temperature row: frequencies follow the kept, renormalized
    probabilities (top-k 4, then top-p 0.85 of their mass: three tokens)."""
    vocab = runner.vocab_size
    logits = np.full((1, vocab), -30.0, dtype="float32")
    logits[0, [7, 3, 100, 50, 9]] = [2.0, 1.5, 1.0, 0.5, 0.4]
    n = 2000
    u = (np.arange(n) + 0.5) / n  # evenly spread draws: frequencies are exact up to 1/n
    tensor = tvm.runtime.tensor(np.repeat(logits, n, 0), runner.device)
    got = np.array(Logits(runner, tensor).sample([1.0] * n, [0.85] * n, [4] * n, u))
    p = np.exp(np.array([2.0, 1.5, 1.0, 0.5]))
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), 0.85)) + 1
    assert keep == 3
    p = p[:keep] / p[:keep].sum()
    freq = np.array([(got == t).mean() for t in (7, 3, 100)])
    assert set(got.tolist()) == {7, 3, 100}
    np.testing.assert_allclose(freq, p, atol=1.5 / n)


def test_greedy_kernel_is_argmax(runner):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, runner.vocab_size)).astype("float32")
    logits[2, [10, 200]] = 50.0  # a tie resolves to the lower id, as NumPy's argmax
    got = Logits(runner, tvm.runtime.tensor(logits, runner.device)).greedy()
    assert got == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize("vocab", [128256, 70001])
def test_greedy_of_a_large_vocabulary_is_argmax(vocab):
    """Past kiln.compiler.sampling.CHUNKED_FROM the argmax runs in chunks (Llama-3's 128,256 in
    32 of 4,008; 70,001 in 18 of 4,096, the last padded): ties across chunks, at a chunk's edge
    and within one resolve to the lowest id, the padded tail's last id wins, and a row of -inf
    gives 0, as NumPy's argmax (on the CPU, the function built alone)."""
    from tvm import relax
    from tvm.relax.frontend import nn

    from kiln.compiler import sampling

    class Greedy(nn.Module):
        def greedy(self, logits: nn.Tensor):
            return sampling.greedy(logits)

    spec = {"greedy": {"logits": nn.spec.Tensor(["n", vocab], "float32")}}
    mod, _ = Greedy().export_tvm(spec=spec)
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    length = sampling.chunk_length(vocab)
    assert vocab > sampling.CHUNKED_FROM and length == (4008 if vocab == 128256 else 4096)
    logits = planted_logits(6, vocab, length, seed=3)
    got = vm["greedy"](tvm.runtime.tensor(logits)).numpy()
    assert got.tolist() == np.argmax(logits, axis=1).tolist()


def test_engine_sampling_on_device(built, monkeypatch):
    """With the kernels choosing tokens, greedy equals the host's greedy, and a seeded request
    gives the same tokens alone and in a batch, run after run."""
    path, device = built
    rng = np.random.default_rng(2)
    prompts = [[1, *rng.integers(3, 320, int(rng.integers(4, 30))).tolist()] for _ in range(5)]
    seeded = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7, "max_tokens": 12}

    def run(on_device: bool, batch: list, **params):
        engine = kiln.Engine(path, device, max_batch_size=8, prefix_cache=False)
        engine.runner.samples_on_device = on_device
        calls = []
        monkeypatch.setattr(Logits, "numpy", _counting(Logits.numpy, calls))
        outs = [o.token_ids for o in engine.generate(batch, ignore_eos=True, **params)]
        monkeypatch.undo()
        return outs, len(calls)

    host, _ = run(False, prompts, temperature=0, max_tokens=12)
    kernels, copies = run(True, prompts, temperature=0, max_tokens=12)
    assert kernels == host and copies == 0  # no logits row reached the host

    alone, copies = run(True, prompts[:1], **seeded)
    batched, _ = run(True, prompts, **seeded)
    again, _ = run(True, prompts, **seeded)
    assert copies == 0 and alone[0] == batched[0] and batched == again
    assert len({tuple(t) for t in batched}) == len(prompts)


def _counting(fn, calls: list):
    def wrapped(self):
        calls.append(1)
        return fn(self)

    return wrapped
