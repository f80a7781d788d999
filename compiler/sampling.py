"""Token sampling compiled into the artifact, so that on a GPU only token ids cross to the host.

- `sample_greedy(logits (n, vocab) f32) -> (n,) int32`: argmax, the lowest id among ties.
- `sample(logits, temperature (n,), top_p (n,), top_k (n,) int32, uniform (n,)) -> (n,) int32`:
  p = softmax(logits / temperature), ranked most likely first; keep the `top_k` most likely (0:
  all), then the shortest run of those whose mass reaches `top_p` of their mass; return the
  first kept token whose running mass exceeds `uniform` x (kept mass). These are the rules of
  kiln.runtime.sampler (top-k before top-p, as transformers' warpers), so a request's
  `uniform` draws come from its own seeded generator on the host wherever it runs.

Penalties and logprobs stay on the host (they need per-request token counts and a log-softmax
the caller reads anyway). Sorting and the running sums are TVM's (DispatchSortScan picks the
GPU sort/scan kernels); the two cut-off kernels below are one thread per (row, rank) in which
exactly one thread per row writes, so every target schedules them as element-wise kernels.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

# A vocabulary past this is argmaxed in chunks: dlight schedules an argmax row as 256 threads that
# each walk vocab / 256 values, and unrolls that walk only up to 256 steps; past it the walk is a
# loop of dependent loads (on an H200, Llama-3's 128,256: 105 us for 64 rows, 50 for one; Llama-2's
# 32,000: 5 us for 64). In chunks: 17 and 7 us (bench/RESULTS.md).
CHUNKED_FROM = 256 * 256
CHUNK = 4096  # the longest chunk (16 values a thread: unrolled)


def greedy(logits: nn.Tensor) -> nn.Tensor:
    """Argmax of each row, the lowest id among ties (so 0 for a row of -inf, where TVM's argmax
    says -1). A vocabulary past CHUNKED_FROM: the argmax of each chunk (a divisor of the
    vocabulary of at most CHUNK values, or CHUNK with the last one padded with -inf), then of the
    chunks' maxima, whose lowest chunk among ties holds the lowest id."""
    n, vocab = logits.shape
    x = logits._expr

    def argmax(t: relax.Expr, axis: int) -> relax.Expr:  # keepdims, never -1
        return relax.op.maximum(relax.op.argmax(t, axis=axis, keepdims=True),
                                relax.const(0, "int64"))  # fmt: skip

    if not isinstance(vocab, int) or vocab <= CHUNKED_FROM:
        ids = argmax(x, 1)
    else:
        length = chunk_length(vocab)
        chunks = -(-vocab // length)
        if chunks * length != vocab:
            x = relax.op.nn.pad(x, [0, 0, 0, chunks * length - vocab], pad_value=float("-inf"))
        x = relax.op.reshape(x, [n, chunks, length])
        local = argmax(x, 2)  # (n, chunks, 1)
        best = relax.op.reshape(relax.op.gather_elements(x, local, axis=2), [n, chunks])
        chunk = argmax(best, 1)  # (n, 1)
        within = relax.op.gather_elements(relax.op.reshape(local, [n, chunks]), chunk, axis=1)
        ids = chunk * relax.const(length, "int64") + within
    return op.wrap_nested(relax.op.astype(relax.op.reshape(ids, [n]), "int32"), "greedy")


def chunk_length(vocab: int) -> int:
    """The largest divisor of `vocab` from CHUNK / 4 to CHUNK (no padding), else CHUNK."""
    return next((d for d in range(CHUNK, CHUNK // 4 - 1, -1) if vocab % d == 0), CHUNK)


def sample(
    logits: nn.Tensor,
    temperature: nn.Tensor,
    top_p: nn.Tensor,
    top_k: nn.Tensor,
    uniform: nn.Tensor,
) -> nn.Tensor:
    n, vocab = logits.shape
    probs = op.softmax(logits / op.reshape(temperature, [n, 1]), axis=-1)
    ranked, ids = op.topk(probs, k=-1, axis=-1, ret_type="both", dtype="int32")
    mass = op.cumsum(ranked, axis=-1)
    end = op.tensor_ir_op(
        _nucleus_end(vocab), "nucleus_end", args=[mass, top_p, top_k],
        out=nn.Tensor.placeholder([n], "int32"),
    )  # fmt: skip
    return op.tensor_ir_op(
        _draw(vocab), "draw", args=[mass, ids, end, uniform],
        out=nn.Tensor.placeholder([n], "int32"),
    )  # fmt: skip


def _nucleus_end(vocab: int):
    """end[i] = how many ranked tokens row i keeps: the first rank r whose running mass reaches
    top_p x (mass of the top k), or the k-th rank, whichever comes first; plus one."""

    @T.prim_func(private=True, s_tir=True)
    def nucleus_end(a: T.handle, b: T.handle, c: T.handle, d: T.handle):
        n = T.int64()
        mass = T.match_buffer(a, (n, vocab), "float32")
        top_p = T.match_buffer(b, (n,), "float32")
        top_k = T.match_buffer(c, (n,), "int32")
        end = T.match_buffer(d, (n,), "int32")
        for i, r in T.grid(n, T.int64(vocab)):
            with T.sblock("nucleus_end"):
                vi, vr = T.axis.remap("SS", [i, r])
                T.reads(mass[vi, 0:vocab], top_p[vi], top_k[vi])
                T.writes(end[vi])
                k = T.if_then_else(0 < top_k[vi] and top_k[vi] < vocab, top_k[vi], vocab)
                last = T.Cast("int64", k - 1)
                t = top_p[vi] * mass[vi, last]
                if (
                    vr <= last
                    and (mass[vi, vr] >= t or vr == last)
                    and (vr == 0 or mass[vi, T.max(vr - 1, 0)] < t)
                ):
                    end[vi] = T.Cast("int32", vr + 1)

    return nucleus_end


def _draw(vocab: int):
    """out[i] = ids[i, r] for the first rank r < end[i] whose running mass exceeds uniform[i] x
    (mass of the first end[i] ranks); the last kept rank if rounding leaves none."""

    @T.prim_func(private=True, s_tir=True)
    def draw(a: T.handle, b: T.handle, c: T.handle, d: T.handle, e: T.handle):
        n = T.int64()
        mass = T.match_buffer(a, (n, vocab), "float32")
        ids = T.match_buffer(b, (n, vocab), "int32")
        end = T.match_buffer(c, (n,), "int32")
        uniform = T.match_buffer(d, (n,), "float32")
        out = T.match_buffer(e, (n,), "int32")
        for i, r in T.grid(n, T.int64(vocab)):
            with T.sblock("draw"):
                vi, vr = T.axis.remap("SS", [i, r])
                T.reads(mass[vi, 0:vocab], ids[vi, vr], end[vi], uniform[vi])
                T.writes(out[vi])
                last = T.Cast("int64", end[vi] - 1)
                target = uniform[vi] * mass[vi, last]
                if (
                    vr <= last
                    and (mass[vi, vr] > target or vr == last)
                    and (vr == 0 or mass[vi, T.max(vr - 1, 0)] <= target)
                ):
                    out[vi] = ids[vi, vr]

    return draw
