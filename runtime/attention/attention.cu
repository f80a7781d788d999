// Kiln's attention for TVM's paged KV cache: `kiln.attention.prefill_ragged` and
// `kiln.attention.prefill_paged`, a FlashAttention-2 style kernel on the tensor cores
// (flash_prefill.cuh) that stands in for TVM's `batch_prefill_ragged_kv` and
// `batch_prefill_paged_kv`, and `kiln.attention.decode_paged`, a split-keys decode kernel
// (flash_decode.cuh) in place of `batch_decode_paged_kv`.
//
// The contracts are those TIR kernels' argument lists, which TVM's C++ cache calls
// (attn_backend.h, TIRRaggedPrefillFunc, TIRPagedPrefillFunc and TIRPagedDecodeFunc).
// prefill_ragged, whenever a prefill chunk attends to its own keys:
//
//   (q (total_q, h_q, d), q_indptr (batch + 1) int32, k (total_kv, h_kv, d),
//    v (total_kv, h_kv, d), kv_indptr (batch + 1) int32, q_rope_position (total_q) int32,
//    k_rope_pos_offset (batch) int32, output (total_q, h_q, d), lse (total_q, h_q) float32,
//    int causal, int rotary_mode, float rope_scale, float rope_theta, float sm_scale)
//
// Sequence b owns q rows q_indptr[b] .. q_indptr[b + 1] and k/v rows kv_indptr[b] ..
// kv_indptr[b + 1]. prefill_paged, whenever the chunk's sequences already have keys in the
// cache's pages (a prompt longer than one chunk, a cached prefix, a later turn):
//
//   (q, q_indptr, pages (num_pages, 2, h_kv, page_size, d), page_indptr (batch + 1) int32,
//    page_values (nnz_pages) int32, length_info (batch) int32, k_rope_pos_offset (batch) int32,
//    q_rope_position (total_q) int32, output, lse, int causal, int rotary_mode,
//    float rope_scale, float rope_theta, float sm_scale)
//
// Sequence b's keys are in the pages page_values[page_indptr[b] .. page_indptr[b + 1]] (K at
// [page, 0, kv_head], V at [page, 1, kv_head], key i at row i % page_size of its i / page_size-th
// page), all full but the last, which holds length_info[b] keys: kv_len = (pages - 1) *
// page_size + length_info[b], 0 without pages. (The sliding-window variant, whose length_info is
// (3, batch), stays TVM's.) The cache passes causal 0 there: the history precedes every query.
//
// In both, with `causal`, row r of a sequence of q_len queries and kv_len keys sees the keys
// c < kv_len - q_len + r + 1 (queries aligned to the end of the keys); without it, every key.
// Scores are in the log2 domain, s = q.k * sm_scale * log2(e), and lse is m + log2(sum 2^(s -
// m)): TVM merges the two kernels' states (merge_state_inplace), so the conventions must match.
// A row that sees no key gets output 0 and lse -5e4, the finite "nothing seen" score TVM's
// kernels start from (so a merge with it stays finite). rotary_mode 1 (RoPE inside attention)
// is refused: Kiln's caches apply RoPE as q/k enter the cache (RopeMode.NORMAL), so the cache
// always passes 0, and the rope arguments are unused.
//
// decode_paged, whenever every sequence of a pass appends one token (after the cache wrote its
// K/V into the pages):
//
//   (q (batch, h_q, d), pages, page_indptr (batch + 1) int32, page_values (nnz_pages) int32,
//    length_info (batch) int32, k_rope_pos_offset (batch) int32, q_rope_position (batch) int32,
//    output (batch, h_q, d), lse (batch, h_q) float32, int rotary_mode, float rope_scale,
//    float rope_theta, float sm_scale)
//
// Query b sees every key of sequence b (the pages as for prefill_paged); the same lse and
// "nothing seen" conventions.
//
// Runs on TVM's current stream for the device (TVMFFIEnvGetStream), as cublas.cc does.

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "../cuda_extern.cuh"
#include "flash_decode.cuh"
#include "flash_prefill.cuh"

namespace kiln {
namespace attention {

using tvm::ffi::Tensor;

template <typename T, int D, int kWarps, typename Keys>
void Launch(const char* name, const Params& p, int64_t total_q, int device, cudaStream_t stream) {
  constexpr int kBlockM = 16 * kWarps;
  constexpr size_t kSmem = size_t{kBlockM + 2 * kBlockN} * (D + 8) * sizeof(T);
  auto kernel = Prefill<T, D, kWarps, Keys>;
  static std::atomic<uint64_t> opted_in{0};
  if (kSmem > 48 * 1024) OptInSharedMemory(kernel, kSmem, device, opted_in, name);
  // Each sequence's tiles, all together, number at most ceil(total_q / kBlockM) + batch.
  const int64_t slots = (total_q + kBlockM - 1) / kBlockM + p.batch;
  TVM_FFI_CHECK(slots <= 65535, ValueError)
      << name << ": " << total_q << " queries in " << p.batch
      << " sequences are more than one call takes";
  dim3 grid(p.h_q, static_cast<unsigned>(slots));
  kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

// 128-row tiles halve the K/V traffic per query but make half as many blocks: take them only
// when there are blocks enough to fill every SM `waves` times over. Causal (ragged) tiles are
// uneven, so they want several waves; a non-causal (paged) tile reads every key, one wave does
// (measured on an H100: bench/RESULTS.md, the kiln64/kiln128 columns).
int AutoTileRows(const char* name, int64_t total_q, int h_q, int device, int waves) {
  const int64_t blocks_at_128 = (total_q + 127) / 128 * h_q;
  return blocks_at_128 >= waves * int64_t{SmCount(name, device)} ? 128 : 64;
}

void CheckTensor(const char* name, const Tensor& t, const char* what, int ndim, int device) {
  TVM_FFI_CHECK(t.ndim() == ndim, ValueError)
      << name << ": " << what << " must have " << ndim << " dimensions, it has " << t.ndim();
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA && t.device().device_id == device, ValueError)
      << name << ": " << what << " must be on cuda:" << device << ", it is on device "
      << t.device().device_type << ":" << t.device().device_id;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << name << ": " << what << " must be contiguous";
}

void CheckDtype(const char* name, const Tensor& t, const char* what, DLDataTypeCode code,
                int bits) {
  DLDataType d = t.dtype();
  TVM_FFI_CHECK(d.code == code && d.bits == bits && d.lanes == 1, TypeError)
      << name << ": " << what << " has dtype code=" << static_cast<int>(d.code)
      << " bits=" << static_cast<int>(d.bits) << ", expected code=" << static_cast<int>(code)
      << " bits=" << bits;
}

void CheckAligned(const char* name, const Tensor& t, const char* what) {
  TVM_FFI_CHECK(reinterpret_cast<uintptr_t>(DataOf(t)) % 16 == 0, ValueError)
      << name << ": " << what << " must be 16-byte aligned";
}

const int32_t* Int32s(const Tensor& t) { return reinterpret_cast<const int32_t*>(DataOf(t)); }

// The element types and head_dims the kernels are built for: float16 or bfloat16 `what`
// (returns whether bfloat16), head_dim 64 or 128.
bool CheckElements(const char* name, DLDataType dt, int64_t d, const char* what) {
  const bool fp16 = dt.code == kDLFloat && dt.bits == 16 && dt.lanes == 1;
  const bool bf16 = dt.code == kDLBfloat && dt.bits == 16 && dt.lanes == 1;
  TVM_FFI_CHECK(fp16 || bf16, TypeError) << name << " takes float16 or bfloat16 " << what;
  TVM_FFI_CHECK(d == 64 || d == 128, ValueError) << name << " takes head_dim 64 or 128, not " << d;
  return bf16;
}

template <typename T>
struct Type {
  using type = T;
};

// launch(Type<T>{}, std::integral_constant<int, D>{}) for the kernels' T (half or bfloat16) and
// D (64 or 128), as CheckElements allows them: the one place a launch becomes a template's.
template <typename Launch>
void WithElements(bool bf16, int64_t d, Launch launch) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (bf16) {
    d == 64 ? launch(Type<__nv_bfloat16>{}, D64{}) : launch(Type<__nv_bfloat16>{}, D128{});
  } else {
    d == 64 ? launch(Type<half>{}, D64{}) : launch(Type<half>{}, D128{});
  }
}

// The paged cache's arguments, as prefill_paged and decode_paged take them: pages (num_pages,
// 2, h_kv, page_size, d) of `code`, and the page table of `batch` sequences, on `device`.
void CheckPageTable(const char* name, const Tensor& pages, const Tensor& page_indptr,
                    const Tensor& page_values, const Tensor& length_info, int device,
                    DLDataTypeCode code, int64_t d, int64_t batch) {
  CheckTensor(name, pages, "pages", 5, device);
  CheckTensor(name, page_indptr, "page_indptr", 1, device);
  CheckTensor(name, page_values, "page_values", 1, device);
  TVM_FFI_CHECK(length_info.ndim() == 1, ValueError)
      << name << ": length_info must be (batch,), the last pages' lengths (a sliding-window "
      << "cache's (3, batch) is TVM's kernel's)";
  CheckTensor(name, length_info, "length_info", 1, device);
  CheckDtype(name, pages, "pages", code, 16);
  CheckDtype(name, page_indptr, "page_indptr", kDLInt, 32);
  CheckDtype(name, page_values, "page_values", kDLInt, 32);
  CheckDtype(name, length_info, "length_info", kDLInt, 32);
  TVM_FFI_CHECK(pages.size(1) == 2 && pages.size(3) > 0 && pages.size(4) == d, ValueError)
      << name << ": pages must be (num_pages, 2, " << pages.size(2) << ", page_size, " << d
      << ")";
  TVM_FFI_CHECK(page_indptr.size(0) == batch + 1 && length_info.size(0) == batch, ValueError)
      << name << ": page_indptr must have " << batch + 1 << " entries and length_info "
      << batch;
  CheckAligned(name, pages, "pages");
}

// -- RoPE and the KV append, deferred -------------------------------------------------------------
//
// For each layer of a pass, TVM's cache runs f_split_rotary(qkv, positions, q, k, v, apply_rope)
// (q and k rotated, v copied out of the fused rows); then, for a pass whose every sequence
// appends one token, f_transpose_append(pages, k, v, slots) and the attention kernels, and for
// a prefill, the attention kernels and then the append (paged_kv_cache.cc,
// AttentionWithFusedQKV). As `kiln.attention.split_rope` and `kiln.attention.append_kv` (a
// cache gets them only where every attention kernel it runs is Kiln's:
// kiln.passes.lower_paged_kv_cache) they record their arguments, per host thread, and the next
// attention call runs them: decode_paged inside its own kernel (two kernels a layer and their
// hand-overs gone from a decode step), the prefill kernels as one kernel (SplitRope) before
// theirs. An append with nothing pending (a prefill's, after its attention) copies at once. The
// RoPE arguments are the attention call's: the cache passes its rope_scale and rope_theta to
// every attention kernel, and bakes the same into the kernel split_rope stands in for.
//
//   split_rope(qkv (tokens, h_q + 2 h_kv, d), positions (tokens) int32, q (tokens, h_q, d),
//              k (tokens, h_kv, d), v (tokens, h_kv, d), int apply_rope)
//   append_kv(pages (num_pages, 2, h_kv, page_size, d), k, v, slots (tokens) int32)
//
// slots[t] is page * page_size + row of token t's K/V, -1 for none (TVM's position map).

constexpr const char* kSplitRope = "kiln.attention.split_rope";
constexpr const char* kAppendKV = "kiln.attention.append_kv";

struct Pending {
  bool split = false, append = false;
  Tensor qkv, positions, q, k, v;  // split_rope's (held until run: the caller may drop them)
  bool rope = false;
  Tensor pages, slots;  // append_kv's
};

thread_local Pending pending;

void CheckRows(const char* name, const Tensor& t, const char* what, int64_t tokens, int64_t heads,
               int64_t d, int device, DLDataTypeCode code) {
  CheckTensor(name, t, what, 3, device);
  CheckDtype(name, t, what, code, 16);
  CheckAligned(name, t, what);
  TVM_FFI_CHECK(t.size(0) == tokens && t.size(1) == heads && t.size(2) == d, ValueError)
      << name << ": " << what << " must be (" << tokens << ", " << heads << ", " << d << ")";
}

void CheckSlots(const char* name, const Tensor& t, const char* what, int64_t tokens, int device) {
  CheckTensor(name, t, what, 1, device);
  CheckDtype(name, t, what, kDLInt, 32);
  TVM_FFI_CHECK(t.size(0) >= tokens, ValueError)
      << name << ": " << what << " has " << t.size(0) << " entries for " << tokens << " tokens";
}

void SplitRopeDeferred(Tensor qkv, Tensor positions, Tensor q, Tensor k, Tensor v,
                       int64_t apply_rope) {
  const char* name = kSplitRope;
  const int device = qkv.device().device_id;
  CheckTensor(name, qkv, "qkv", 3, device);
  const DLDataType dt = qkv.dtype();
  const int64_t tokens = qkv.size(0), d = qkv.size(2);
  CheckElements(name, dt, d, "rows");
  const auto code = static_cast<DLDataTypeCode>(dt.code);
  TVM_FFI_CHECK(q.ndim() == 3 && k.ndim() == 3, ValueError) << name << ": q and k must be 3-D";
  const int64_t h_q = q.size(1), h_kv = k.size(1);
  CheckRows(name, qkv, "qkv", tokens, h_q + 2 * h_kv, d, device, code);
  CheckRows(name, q, "q", tokens, h_q, d, device, code);
  CheckRows(name, k, "k", tokens, h_kv, d, device, code);
  CheckRows(name, v, "v", tokens, h_kv, d, device, code);
  CheckSlots(name, positions, "positions", tokens, device);
  pending = Pending{};
  pending.split = true;
  pending.qkv = qkv, pending.positions = positions;
  pending.q = q, pending.k = k, pending.v = v;
  pending.rope = apply_rope != 0;
}

template <typename T, int D>
void LaunchAppend(const AppendParams& p, cudaStream_t stream) {
  const dim3 grid(p.tokens, (p.h_kv * D / 8 + kRopeThreads - 1) / kRopeThreads);
  AppendKV<T, D><<<grid, kRopeThreads, 0, stream>>>(p);
  CheckCuda(cudaGetLastError(), kAppendKV, "the kernel launch");
}

void AppendDeferred(Tensor pages, Tensor k, Tensor v, Tensor slots) {
  const char* name = kAppendKV;
  const int device = k.device().device_id;
  CheckTensor(name, k, "k", 3, device);
  const DLDataType dt = k.dtype();
  const int64_t tokens = k.size(0), h_kv = k.size(1), d = k.size(2);
  const bool bf16 = CheckElements(name, dt, d, "k and v");
  const auto code = static_cast<DLDataTypeCode>(dt.code);
  CheckRows(name, k, "k", tokens, h_kv, d, device, code);
  CheckRows(name, v, "v", tokens, h_kv, d, device, code);
  CheckTensor(name, pages, "pages", 5, device);
  CheckDtype(name, pages, "pages", code, 16);
  CheckAligned(name, pages, "pages");
  TVM_FFI_CHECK(pages.size(1) == 2 && pages.size(2) == h_kv && pages.size(4) == d, ValueError)
      << name << ": pages must be (num_pages, 2, " << h_kv << ", page_size, " << d << ")";
  CheckSlots(name, slots, "slots", tokens, device);
  const int page_size = static_cast<int>(pages.size(3));
  if (pending.split && DataOf(pending.k) == DataOf(k) && DataOf(pending.v) == DataOf(v)) {
    pending.append = true;
    pending.pages = pages, pending.slots = slots;
    return;
  }
  if (tokens == 0) return;
  const AppendParams p{DataOf(k), DataOf(v), DataOf(pages), Int32s(slots),
                       static_cast<int>(tokens), static_cast<int>(h_kv), page_size};
  cudaStream_t stream = TvmStream(name, device);
  WithElements(bf16, d, [&](auto type, auto dim) {
    LaunchAppend<typename decltype(type)::type, decltype(dim)::value>(p, stream);
  });
}

template <typename T, int D>
void LaunchSplitRope(const SplitRopeParams& p, cudaStream_t stream) {
  const int threads = (p.h_q + 2 * p.h_kv) * D / 8;
  const dim3 grid(p.tokens, (threads + kRopeThreads - 1) / kRopeThreads);
  SplitRope<T, D><<<grid, kRopeThreads, 0, stream>>>(p);
  CheckCuda(cudaGetLastError(), kSplitRope, "the kernel launch");
}

// inv_freq[i] = rope_scale / rope_theta^(2i / d), kept for the last (scale, theta, d) asked.
const RopeTable& Frequencies(double rope_scale, double rope_theta, int d) {
  thread_local RopeTable table{};
  thread_local double last[3] = {0, 0, 0};
  if (last[0] != rope_scale || last[1] != rope_theta || last[2] != d) {
    for (int i = 0; i < d / 2; ++i) {
      table.inv_freq[i] = static_cast<float>(rope_scale / std::pow(rope_theta, 2.0 * i / d));
    }
    last[0] = rope_scale, last[1] = rope_theta, last[2] = d;
  }
  return table;
}

// Runs what split_rope and append_kv left pending (one kernel), for the attention call `name`.
void RunPending(const char* name, double rope_scale, double rope_theta) {
  if (!pending.split) return;
  const Pending w = pending;
  pending = Pending{};
  const int tokens = static_cast<int>(w.qkv.size(0)), d = static_cast<int>(w.qkv.size(2));
  if (tokens == 0) return;
  const SplitRopeParams p{DataOf(w.qkv),
                          Int32s(w.positions),
                          DataOf(w.q),
                          DataOf(w.k),
                          DataOf(w.v),
                          w.append ? DataOf(w.pages) : nullptr,
                          w.append ? Int32s(w.slots) : nullptr,
                          tokens,
                          static_cast<int>(w.q.size(1)),
                          static_cast<int>(w.k.size(1)),
                          w.append ? static_cast<int>(w.pages.size(3)) : 0,
                          w.rope,
                          Frequencies(rope_scale, rope_theta, d)};
  cudaStream_t stream = TvmStream(name, w.qkv.device().device_id);
  WithElements(w.qkv.dtype().code == kDLBfloat, d, [&](auto type, auto dim) {
    LaunchSplitRope<typename decltype(type)::type, decltype(dim)::value>(p, stream);
  });
}

// What both entry points take alike: q, q_indptr, output and lse, and the scalars. Checks them
// (with h_kv KV heads and batch + 1 = q_indptr's length) and fills their part of `p`.
struct Query {
  const char* name;
  int device;
  bool bf16;
  int64_t total_q, h_q, d, batch;
};

Query CheckQuery(const char* name, const Tensor& q, const Tensor& q_indptr, const Tensor& out,
                 const Tensor& lse, int64_t h_kv, int64_t tile_rows, int64_t causal,
                 int64_t rotary_mode, double sm_scale, Params* p) {
  TVM_FFI_CHECK(rotary_mode == 0, ValueError)
      << name << " does not apply RoPE (rotary_mode " << rotary_mode
      << "): Kiln's KV caches apply it as q and k enter the cache";
  TVM_FFI_CHECK(tile_rows == 0 || tile_rows == 64 || tile_rows == 128, ValueError)
      << name << ": tile_rows must be 0, 64 or 128, not " << tile_rows;
  const int device = q.device().device_id;
  CheckTensor(name, q, "q", 3, device);
  CheckTensor(name, out, "output", 3, device);
  CheckTensor(name, lse, "lse", 2, device);
  CheckTensor(name, q_indptr, "q_indptr", 1, device);
  const DLDataType dt = q.dtype();
  const bool bf16 = CheckElements(name, dt, q.size(2), "q, k and v");
  CheckDtype(name, out, "output", static_cast<DLDataTypeCode>(dt.code), 16);
  CheckDtype(name, lse, "lse", kDLFloat, 32);
  CheckDtype(name, q_indptr, "q_indptr", kDLInt, 32);
  const Query query{name, device, bf16, q.size(0), q.size(1), q.size(2), q_indptr.size(0) - 1};
  TVM_FFI_CHECK(h_kv > 0 && query.h_q % h_kv == 0, ValueError)
      << name << ": " << query.h_q << " query heads are not a multiple of " << h_kv
      << " KV heads";
  TVM_FFI_CHECK(out.size(0) == query.total_q && out.size(1) == query.h_q && out.size(2) == query.d,
                ValueError)
      << name << ": output must be shaped as q";
  TVM_FFI_CHECK(lse.size(0) == query.total_q && lse.size(1) == query.h_q, ValueError)
      << name << ": lse must be (total_q, h_q)";
  TVM_FFI_CHECK(query.batch >= 0, ValueError) << name << ": q_indptr is empty";
  CheckAligned(name, q, "q");
  CheckAligned(name, out, "output");
  p->q = DataOf(q);
  p->out = DataOf(out);
  p->lse = reinterpret_cast<float*>(DataOf(lse));
  p->q_indptr = Int32s(q_indptr);
  p->batch = static_cast<int>(query.batch);
  p->h_q = static_cast<int>(query.h_q);
  p->h_kv = static_cast<int>(h_kv);
  p->group = static_cast<int>(query.h_q / h_kv);
  p->causal = causal != 0;
  p->scale_log2 = static_cast<float>(sm_scale) * kLog2e;
  return query;
}

// Runs the kernel with keys from Keys (RaggedKeys or PagedKeys) on TVM's stream.
template <template <typename, int> class Keys>
void Run(const Query& query, const Params& p, int64_t tile_rows, int waves) {
  if (query.total_q == 0 || query.batch == 0 || query.h_q == 0) return;
  const char* name = query.name;
  const int device = query.device;
  cudaStream_t stream = TvmStream(name, device);
  const int64_t n = query.total_q;
  const bool wide = (tile_rows ? tile_rows : AutoTileRows(name, n, p.h_q, device, waves)) == 128;
  WithElements(query.bf16, query.d, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    constexpr int D = decltype(dim)::value;
    wide ? Launch<T, D, 8, Keys<T, D>>(name, p, n, device, stream)
         : Launch<T, D, 4, Keys<T, D>>(name, p, n, device, stream);
  });
}

constexpr const char* kRagged = "kiln.attention.prefill_ragged";
constexpr const char* kPaged = "kiln.attention.prefill_paged";

// `tile_rows`: 64, 128, or 0 to choose by the amount of work.
void PrefillRaggedTiled(int64_t tile_rows, Tensor q, Tensor q_indptr, Tensor k, Tensor v,
                        Tensor kv_indptr, Tensor q_rope_position, Tensor k_rope_pos_offset,
                        Tensor out, Tensor lse, int64_t causal, int64_t rotary_mode,
                        double rope_scale, double rope_theta, double sm_scale) {
  (void)q_rope_position, (void)k_rope_pos_offset;
  const char* name = kRagged;
  RunPending(name, rope_scale, rope_theta);
  const int64_t h_kv = k.ndim() == 3 ? k.size(1) : 1;  // (k's shape is checked below)
  Params p{};
  const Query query =
      CheckQuery(name, q, q_indptr, out, lse, h_kv, tile_rows, causal, rotary_mode, sm_scale, &p);
  CheckTensor(name, k, "k", 3, query.device);
  CheckTensor(name, v, "v", 3, query.device);
  CheckTensor(name, kv_indptr, "kv_indptr", 1, query.device);
  const auto code = query.bf16 ? kDLBfloat : kDLFloat;
  CheckDtype(name, k, "k", code, 16);
  CheckDtype(name, v, "v", code, 16);
  CheckDtype(name, kv_indptr, "kv_indptr", kDLInt, 32);
  TVM_FFI_CHECK(k.size(2) == query.d && v.size(0) == k.size(0) && v.size(1) == h_kv &&
                    v.size(2) == query.d,
                ValueError)
      << name << ": k and v must both be (total_kv, " << h_kv << ", " << query.d << ")";
  TVM_FFI_CHECK(kv_indptr.size(0) == query.batch + 1, ValueError)
      << name << ": q_indptr and kv_indptr must have the same length";
  CheckAligned(name, k, "k");
  CheckAligned(name, v, "v");
  p.k = DataOf(k);
  p.v = DataOf(v);
  p.kv_indptr = Int32s(kv_indptr);
  Run<RaggedKeys>(query, p, tile_rows, /*waves=*/4);
}

void PrefillRagged(Tensor q, Tensor q_indptr, Tensor k, Tensor v, Tensor kv_indptr,
                   Tensor q_rope_position, Tensor k_rope_pos_offset, Tensor out, Tensor lse,
                   int64_t causal, int64_t rotary_mode, double rope_scale, double rope_theta,
                   double sm_scale) {
  PrefillRaggedTiled(0, q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, out,
                     lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale);
}

void PrefillPagedTiled(int64_t tile_rows, Tensor q, Tensor q_indptr, Tensor pages,
                       Tensor page_indptr, Tensor page_values, Tensor length_info,
                       Tensor k_rope_pos_offset, Tensor q_rope_position, Tensor out, Tensor lse,
                       int64_t causal, int64_t rotary_mode, double rope_scale, double rope_theta,
                       double sm_scale) {
  (void)q_rope_position, (void)k_rope_pos_offset;
  const char* name = kPaged;
  RunPending(name, rope_scale, rope_theta);
  const int64_t h_kv = pages.ndim() == 5 ? pages.size(2) : 1;  // (checked below)
  Params p{};
  const Query query =
      CheckQuery(name, q, q_indptr, out, lse, h_kv, tile_rows, causal, rotary_mode, sm_scale, &p);
  CheckPageTable(name, pages, page_indptr, page_values, length_info, query.device,
                 query.bf16 ? kDLBfloat : kDLFloat, query.d, query.batch);
  p.pages = DataOf(pages);
  p.page_indptr = Int32s(page_indptr);
  p.page_values = Int32s(page_values);
  p.last_page_len = Int32s(length_info);
  p.page_size = static_cast<int>(pages.size(3));
  Run<PagedKeys>(query, p, tile_rows, /*waves=*/1);
}

void PrefillPaged(Tensor q, Tensor q_indptr, Tensor pages, Tensor page_indptr,
                  Tensor page_values, Tensor length_info, Tensor k_rope_pos_offset,
                  Tensor q_rope_position, Tensor out, Tensor lse, int64_t causal,
                  int64_t rotary_mode, double rope_scale, double rope_theta, double sm_scale) {
  PrefillPagedTiled(0, q, q_indptr, pages, page_indptr, page_values, length_info,
                    k_rope_pos_offset, q_rope_position, out, lse, causal, rotary_mode, rope_scale,
                    rope_theta, sm_scale);
}

// -- decode --------------------------------------------------------------------------------------

constexpr const char* kDecode = "kiln.attention.decode_paged";
constexpr int kMaxSplits = 64;
constexpr int kMinSplitKeys = 16;  // fewer keys a block cost more in merging than they save

// The split decode's scratch, one per device, grown as calls need and kept: the counters (zero
// between calls: the merging block resets its own, and a call with more blocks than any before
// finds the new ones zeroed) and each split's m/l and o. A call that needs more than any before
// waits for the device once; it takes room for any split count of its batch (up to
// kReserveBytes), so that a batch-1 step captured into a CUDA graph after one uncaptured step
// (kiln.runtime.step_graph) never has to grow it: a captured call cannot wait for the device.
struct DecodeScratch {
  int* counters;
  float* states;
};

constexpr size_t kReserveBytes = size_t{16} << 20;

void Grow(void** buffer, size_t* size, size_t need, size_t reserve, cudaStream_t stream) {
  if (*size >= need) return;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  CheckCuda(cudaStreamIsCapturing(stream, &capturing), kDecode, "cudaStreamIsCapturing");
  TVM_FFI_CHECK(capturing == cudaStreamCaptureStatusNone, RuntimeError)
      << kDecode << ": the split scratch must grow to " << need << " bytes, which a call "
      << "captured into a CUDA graph cannot do: run the same call once uncaptured first";
  const size_t bytes = std::max({need, std::min(reserve, kReserveBytes), size_t{1} << 16});
  CheckCuda(cudaDeviceSynchronize(), kDecode, "cudaDeviceSynchronize");  // the old one in use
  if (*buffer != nullptr) CheckCuda(cudaFree(*buffer), kDecode, "cudaFree");
  *buffer = nullptr, *size = 0;
  CheckCuda(cudaMalloc(buffer, bytes), kDecode, "cudaMalloc");
  CheckCuda(cudaMemset(*buffer, 0, bytes), kDecode, "cudaMemset");
  *size = bytes;
}

// `states`: the floats this call needs; `most`: what the most splits of its batch would.
DecodeScratch DecodeWorkspace(int device, size_t counters, size_t states, size_t most,
                              cudaStream_t stream) {
  static std::mutex mu;
  static void* buffers[64][2] = {};
  static size_t sizes[64][2] = {};
  std::lock_guard<std::mutex> lock(mu);
  const int i = device % 64;
  const size_t ints = counters * sizeof(int);
  Grow(&buffers[i][0], &sizes[i][0], ints, ints, stream);
  Grow(&buffers[i][1], &sizes[i][1], states * sizeof(float), most * sizeof(float), stream);
  return {static_cast<int*>(buffers[i][0]), static_cast<float*>(buffers[i][1])};
}

// Splits of each sequence's keys so that the grid fills the GPU about four times over, each
// split at least kMinSplitKeys keys of the batch's mean history, and all of them in one wave:
// at most the blocks the GPU holds at once (`resident`, by the kernel's occupancy). H200, batch
// 1, 32 query heads of 128 (bench/RESULTS.md), against the earlier rule (twice over, 32 keys):
// after 1024 keys 9.0 us against 10.1, after 4096 24.9 against 29.0 (8 KV heads: 20.5 against
// 24.8), after 200 6.2 against 6.6, at 130 and 384 the same within 0.2 us. The one-wave bound
// (bench/NOTES.md, sixteenth session): a second, partial wave and the merge cost more than the
// splits save. Fused calls at the split count this picks (timed with it forced), 8 KV heads
// of 128, 4 query heads a block: 64 x 576 keys 68.3 -> 54.9 us (1 split), 32 x 576 44.5 -> 36.4
// (2), 16 x 1024 41.8 -> 33.2 (4), but 8 x 1024 25.9 -> 27.6 (8 splits, not 9); 32 KV heads,
// one a block: 8 x 1024 51.0 -> 41.3, 16 x 1024 81.7 -> 72.1.
int AutoSplits(int64_t blocks, int64_t batch, int64_t nnz_pages, int64_t page_size, int sms,
               int64_t resident) {
  const int64_t want = std::min((4 * int64_t{sms} + blocks - 1) / blocks, resident / blocks);
  const int64_t mean_keys = batch > 0 ? nnz_pages * page_size / batch : 0;
  const int64_t most = std::max<int64_t>(1, mean_keys / kMinSplitKeys);
  return static_cast<int>(std::clamp<int64_t>(std::min(want, most), 1, kMaxSplits));
}

// Query heads a block takes: the group (rounded up to a power of two, at most kMaxDecodeHeads),
// so that a block reads its KV head's keys once for all of them; but where a call has few keys,
// one or two, so that the grid has 4-8x the blocks, each with a fraction of the work, and the
// keys read again come from L2. H200, 32 query and 8 KV heads of 128 (bench/NOTES.md,
// nineteenth session; us with 1 / 2 / 4 heads a block): 2 x 1024 keys 12.3 / 12.9 / 17.4, 1 x
// 4096 20.6 / 18.1 / 23.2, but from 32 (sequence, KV head) pairs and ~12 MiB the group wins:
// 4 x 512 11.8 / 12.1 / 12.9, 4 x 1024 18.0 / 17.3 / 14.9, 8 x 512 17.7 / 17.2 / 14.1, 16 x 512
// 29.4 / 26.3 / 18.5 (8 x 256 11.5 all three). `pairs`: sequences x KV heads. `wanted` (1, 2, 4
// or 8) overrides it for tests and benchmarks, at most the group.
constexpr int64_t kOneHeadBytes = int64_t{4} << 20;   // K/V a call reads, at most
constexpr int64_t kTwoHeadsBytes = int64_t{32} << 20;
constexpr int64_t kGroupPairs = 32;                    // with more than kGroupBytes of K/V
constexpr int64_t kGroupBytes = int64_t{12} << 20;

int DecodeHeads(int64_t group, int64_t kv_bytes, int64_t pairs, int64_t wanted) {
  int heads = 1;
  while (heads < group && heads < kMaxDecodeHeads) heads *= 2;
  if (wanted > 0) return std::min(heads, static_cast<int>(wanted));
  if (kv_bytes <= kOneHeadBytes) return 1;
  if (pairs >= kGroupPairs && kv_bytes > kGroupBytes) return heads;
  return kv_bytes <= kTwoHeadsBytes ? std::min(heads, 2) : heads;
}

// Blocks of a decode kernel an SM holds (asked once a process: one kind of GPU).
template <typename T, int D, int H, bool kFused>
int DecodeBlocksPerSm() {
  static const int n = [] {
    int blocks = 0;
    CheckCuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Decode<T, D, H, kFused>,
                                                            kDecodeThreads, DecodeRingBytes(H)),
              kDecode, "the occupancy query");
    return std::max(blocks, 1);
  }();
  return n;
}

// fn(kernel, its dynamic shared memory, its blocks an SM) with the decode kernel of `heads`
// query heads a block.
template <typename T, int D, typename Fn>
void WithDecodeKernel(int heads, bool fused, Fn fn) {
  auto pick = [&](auto h) {
    constexpr int H = decltype(h)::value;
    fused ? fn(Decode<T, D, H, true>, DecodeRingBytes(H), DecodeBlocksPerSm<T, D, H, true>())
          : fn(Decode<T, D, H, false>, DecodeRingBytes(H), DecodeBlocksPerSm<T, D, H, false>());
  };
  switch (heads) {
    case 1: return pick(std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, 2>{});
    case 4: return pick(std::integral_constant<int, 4>{});
    default: return pick(std::integral_constant<int, 8>{});
  }
}

// `heads`: query heads a block takes (1, 2, 4 or 8; 0 chooses), `splits`: runs of keys per
// sequence (0 chooses by the amount of work).
void DecodePagedTiled(int64_t heads_wanted, int64_t splits, Tensor q, Tensor pages,
                      Tensor page_indptr, Tensor page_values, Tensor length_info,
                      Tensor k_rope_pos_offset, Tensor q_rope_position, Tensor out, Tensor lse,
                      int64_t rotary_mode, double rope_scale, double rope_theta,
                      double sm_scale) {
  (void)k_rope_pos_offset, (void)q_rope_position;
  const char* name = kDecode;
  TVM_FFI_CHECK(rotary_mode == 0, ValueError)
      << name << " does not apply RoPE (rotary_mode " << rotary_mode
      << "): Kiln's KV caches apply it as q and k enter the cache";
  TVM_FFI_CHECK(splits >= 0 && splits <= kMaxSplits, ValueError)
      << name << ": splits must be 0 (choose) to " << kMaxSplits << ", not " << splits;
  TVM_FFI_CHECK(heads_wanted >= 0 && heads_wanted <= kMaxDecodeHeads &&
                    (heads_wanted & (heads_wanted - 1)) == 0,
                ValueError)
      << name << ": heads must be 0 (choose), 1, 2, 4 or 8, not " << heads_wanted;
  const int device = q.device().device_id;
  CheckTensor(name, q, "q", 3, device);
  CheckTensor(name, out, "output", 3, device);
  CheckTensor(name, lse, "lse", 2, device);
  const DLDataType dt = q.dtype();
  const int64_t batch = q.size(0), h_q = q.size(1), d = q.size(2);
  const bool bf16 = CheckElements(name, dt, d, "q and pages");
  const auto code = static_cast<DLDataTypeCode>(dt.code);
  CheckDtype(name, out, "output", code, 16);
  CheckDtype(name, lse, "lse", kDLFloat, 32);
  CheckPageTable(name, pages, page_indptr, page_values, length_info, device, code, d, batch);
  const int64_t h_kv = pages.size(2);
  TVM_FFI_CHECK(h_kv > 0 && h_q % h_kv == 0, ValueError)
      << name << ": " << h_q << " query heads are not a multiple of " << h_kv << " KV heads";
  TVM_FFI_CHECK(out.size(0) == batch && out.size(1) == h_q && out.size(2) == d, ValueError)
      << name << ": output must be shaped as q";
  TVM_FFI_CHECK(lse.size(0) == batch && lse.size(1) == h_q, ValueError)
      << name << ": lse must be (batch, h_q)";
  CheckAligned(name, q, "q");
  CheckAligned(name, out, "output");
  DecodeParams p{};
  // RoPE and the append pending for exactly this call's q and pages: done by the kernel itself
  // (`held` keeps their tensors until it is queued).
  const Pending held = pending;
  const bool fused = held.split && held.append && held.rope && DataOf(held.q) == DataOf(q) &&
                     DataOf(held.pages) == DataOf(pages) && held.qkv.size(0) == batch &&
                     held.qkv.size(1) == h_q + 2 * h_kv && held.qkv.size(2) == d &&
                     held.qkv.dtype().code == dt.code;
  if (fused) {
    pending = Pending{};
    p.qkv = DataOf(held.qkv);
    p.position = Int32s(held.positions);
    p.slot = Int32s(held.slots);
    p.q_rotated = DataOf(q);
    p.rope = Frequencies(rope_scale, rope_theta, static_cast<int>(d));
  } else {
    RunPending(name, rope_scale, rope_theta);
  }
  if (batch == 0 || h_q == 0) return;

  cudaStream_t stream = TvmStream(name, device);

  const int64_t group = h_q / h_kv;
  const int64_t kv_bytes = page_values.size(0) * pages.size(3) * h_kv * d * 2 * 2;  // K and V
  const int heads = DecodeHeads(group, kv_bytes, batch * h_kv, heads_wanted);
  p.q = DataOf(q);
  p.out = DataOf(out);
  p.lse = reinterpret_cast<float*>(DataOf(lse));
  p.pages = DataOf(pages);
  p.page_indptr = Int32s(page_indptr);
  p.page_values = Int32s(page_values);
  p.last_page_len = Int32s(length_info);
  p.batch = static_cast<int>(batch);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.group = static_cast<int>(group);
  p.page_size = static_cast<int>(pages.size(3));
  p.slices = static_cast<int>((group + heads - 1) / heads);
  p.scale_log2 = static_cast<float>(sm_scale) * kLog2e;
  const int64_t blocks = batch * h_kv * p.slices;
  TVM_FFI_CHECK(batch <= 65535 && h_kv * p.slices <= 65535, ValueError)
      << name << ": " << batch << " sequences of " << h_q << " heads are more than one call takes";
  WithElements(bf16, d, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    WithDecodeKernel<T, decltype(dim)::value>(heads, fused, [&](auto kernel, int smem,
                                                                int per_sm) {
      const int sms = SmCount(name, device);
      p.splits = splits ? static_cast<int>(splits)
                        : AutoSplits(blocks, batch, page_values.size(0), p.page_size, sms,
                                     int64_t{sms} * per_sm);
      if (p.splits > 1) {
        const size_t states = static_cast<size_t>(p.splits) * batch * h_q;
        const size_t most = static_cast<size_t>(kMaxSplits) * batch * h_q;
        const DecodeScratch scratch =
            DecodeWorkspace(device, blocks, states * (2 + d), most * (2 + d), stream);
        p.counters = scratch.counters;
        p.partial_ml = scratch.states;
        p.partial_o = scratch.states + 2 * states;
      }
      kernel<<<dim3(p.splits, h_kv * p.slices, batch), kDecodeThreads, smem, stream>>>(p);
      CheckCuda(cudaGetLastError(), name, "the kernel launch");
    });
  });
}

void DecodePagedSplit(int64_t splits, Tensor q, Tensor pages, Tensor page_indptr,
                      Tensor page_values, Tensor length_info, Tensor k_rope_pos_offset,
                      Tensor q_rope_position, Tensor out, Tensor lse, int64_t rotary_mode,
                      double rope_scale, double rope_theta, double sm_scale) {
  DecodePagedTiled(0, splits, q, pages, page_indptr, page_values, length_info, k_rope_pos_offset,
                   q_rope_position, out, lse, rotary_mode, rope_scale, rope_theta, sm_scale);
}

void DecodePaged(Tensor q, Tensor pages, Tensor page_indptr, Tensor page_values,
                 Tensor length_info, Tensor k_rope_pos_offset, Tensor q_rope_position, Tensor out,
                 Tensor lse, int64_t rotary_mode, double rope_scale, double rope_theta,
                 double sm_scale) {
  DecodePagedSplit(0, q, pages, page_indptr, page_values, length_info, k_rope_pos_offset,
                   q_rope_position, out, lse, rotary_mode, rope_scale, rope_theta, sm_scale);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      // TVM's batch_prefill_ragged_kv, batch_prefill_paged_kv and batch_decode_paged_kv
      // contracts (the cache calls them)
      .def(kRagged, PrefillRagged)
      .def(kPaged, PrefillPaged)
      .def(kDecode, DecodePaged)
      // TVM's fused_rope and tir_kv_cache_transpose_append contracts, run by the attention
      // call after them (the "deferred" section)
      .def(kSplitRope, SplitRopeDeferred)
      .def(kAppendKV, AppendDeferred)
      // The same with the tile height (64 or 128 rows) or the splits fixed (0 chooses): for
      // tests and benchmarks
      .def("kiln.attention.prefill_ragged_tiled", PrefillRaggedTiled)
      .def("kiln.attention.prefill_paged_tiled", PrefillPagedTiled)
      .def("kiln.attention.decode_paged_split", DecodePagedSplit)
      .def("kiln.attention.decode_paged_tiled", DecodePagedTiled);
}

}  // namespace attention
}  // namespace kiln
