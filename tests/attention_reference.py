"""Float64 NumPy models of TVM's prefill attention kernels, the contracts of Kiln's prefill
attention externs (runtime/attention/flash_prefill.cu): the ragged one (a chunk's queries
against keys given as rows) and the paged one (against keys in the KV cache's pages). The CPU
tests check them against TVM's own CPU kernels; the GPU tests check Kiln's kernel against them.
"""

from __future__ import annotations

import numpy as np

EMPTY_LSE = -5e4  # a row that sees no key (TVM's kernels' starting score)


def visible(q_len: int, kv_len: int, causal: bool) -> np.ndarray:
    """(q_len, kv_len): which keys each query sees; under `causal`, queries are aligned to the
    end of the keys (row r sees c < kv_len - q_len + r + 1)."""
    if not causal:
        return np.ones((q_len, kv_len), bool)
    return np.arange(kv_len)[None, :] < kv_len - q_len + np.arange(q_len)[:, None] + 1


def reference(q, k, v, q_indptr, kv_indptr, causal: bool, sm_scale: float):
    """Attention in float64 with TVM's conventions: queries aligned to the end of the keys under
    `causal`, lse = log2(sum 2^(s)) of scores s = q.k * sm_scale * log2(e); a row that sees no
    key: output 0, lse -5e4."""
    total_q, h_q, head_dim = q.shape
    group = h_q // k.shape[1]
    out = np.zeros((total_q, h_q, head_dim))
    lse = np.zeros((total_q, h_q))
    for b in range(len(q_indptr) - 1):
        q0, q1, k0, k1 = q_indptr[b], q_indptr[b + 1], kv_indptr[b], kv_indptr[b + 1]
        seen = visible(q1 - q0, k1 - k0, causal)
        empty = ~seen.any(axis=1)
        for h in range(h_q):
            qh = q[q0:q1, h].astype(np.float64)
            kh, vh = k[k0:k1, h // group].astype(np.float64), v[k0:k1, h // group]
            s = np.where(seen, qh @ kh.T * sm_scale * np.log2(np.e), -np.inf)
            m = np.where(empty, 0.0, s.max(axis=1, initial=-np.inf))
            p = np.exp2(s - m[:, None])
            total = np.where(empty, 1.0, p.sum(axis=1))
            out[q0:q1, h] = np.where(
                empty[:, None], 0.0, p @ vh.astype(np.float64) / total[:, None]
            )
            lse[q0:q1, h] = np.where(empty, EMPTY_LSE, m + np.log2(total))
    return out, lse


def gather_pages(pages, page_indptr, page_values, last_page_len):
    """The keys and values of each sequence from the pages (num_pages, 2, h_kv, page_size, d),
    as TVM's paged kernels read them: sequence b's pages are page_values[page_indptr[b] ..
    page_indptr[b + 1]], all full but the last, which holds last_page_len[b] keys.
    Returns (k, v, kv_indptr) of a ragged batch."""
    _, _, h_kv, page_size, d = pages.shape
    ks, vs, lengths = [], [], []
    for b in range(len(page_indptr) - 1):
        ids = page_values[page_indptr[b] : page_indptr[b + 1]]
        n = (len(ids) - 1) * page_size + int(last_page_len[b]) if len(ids) else 0
        kv = pages[ids].transpose(1, 0, 3, 2, 4).reshape(2, len(ids) * page_size, h_kv, d)
        ks.append(kv[0, :n])
        vs.append(kv[1, :n])
        lengths.append(n)
    kv_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype("int32")
    return np.concatenate(ks), np.concatenate(vs), kv_indptr


def paged_reference(q, q_indptr, pages, page_indptr, page_values, last_page_len, causal: bool,
                    sm_scale: float):  # fmt: skip
    """TVM's batch_prefill_paged_kv (not sliding-window) in float64: the ragged model on the
    keys gathered from the pages."""
    k, v, kv_indptr = gather_pages(pages, page_indptr, page_values, last_page_len)
    return reference(q, k, v, q_indptr, kv_indptr, causal, sm_scale)


def random_page_table(rng, histories: list[int], page_size: int, spare: int = 3):
    """A page table holding sequences of `histories` keys in shuffled, non-contiguous pages out
    of a pool with `spare` pages more: (num_pages, page_indptr, page_values, last_page_len)."""
    counts = [-(-n // page_size) for n in histories]
    num_pages = sum(counts) + spare
    page_values = rng.permutation(num_pages)[: sum(counts)].astype("int32")
    page_indptr = np.concatenate([[0], np.cumsum(counts)]).astype("int32")
    last = [(n - 1) % page_size + 1 if n else 0 for n in histories]
    return num_pages, page_indptr, page_values, np.array(last, "int32")
