// Kiln's decode attention kernel (device code) for `kiln.attention.decode_paged`: one query per
// sequence against the keys in the paged KV cache, split over the keys (flash-decoding).
//
// TVM's batch_decode_paged_kv gives each (sequence, KV head) one thread block, so a batch of one
// on a 32-head model runs 32 blocks: a quarter of an H100's SMs, each walking the whole history.
// Here each (sequence, KV head, slice of up to kHeads of its query heads) is cut into `splits`
// equal runs of keys, one block each, chosen by the host so that the grid fills the GPU (and
// where a call has few keys, slices of one or two heads: attention.cu's DecodeHeads). A
// block's 4 warps walk their run in key groups of D / 8 lanes: each lane holds 8 elements
// (16 bytes) of a key row and of the query heads' rows, the group's lanes sum their products
// with shuffles, and every group keeps its own online-softmax state (running max m, sum l, the
// unnormalised output o), which the block merges at the end. Loads go 16 bytes a lane, kUnroll
// keys' K and V rows at once (2 x kUnroll x 512 bytes a warp): with one query head a block,
// straight into registers; with more, through a ring in shared memory that keeps the next
// iteration's in flight while a warp computes (DecodeRing).
//
// With one split a block writes the output and lse itself. With more, each writes its state to
// a workspace, and the last of a (sequence, slice)'s blocks to finish (an atomic counter, which
// it resets) merges them: no second kernel. Scores are in the log2 domain (s = q.k * sm_scale *
// log2(e), lse = m + log2(l)), as TVM's kernels and merge_state_inplace count them; a sequence
// without keys gets output 0 and lse -5e4.
//
// Fused (kFused), the kernel also does what the cache would have run before it as two kernels:
// RoPE of the new token's q and k and the append of its k and v to the pages (attention.cu's
// "deferred" section).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash_prefill.cuh"  // cp.async helpers
#include "rope_append.cuh"

namespace kiln {
namespace attention {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMaxDecodeHeads = 8;  // query heads a block takes (a KV head's group, in slices)
constexpr int kDecodeStages = 2;    // iterations of K/V rows in a warp's ring (DecodeRing)
constexpr float kDecodeEmptyLse = -5e4f;  // TVM's "nothing seen" score

struct DecodeParams {
  const void* q;                 // (batch, h_q, d)
  void* out;                     // (batch, h_q, d)
  float* lse;                    // (batch, h_q)
  const void* pages;             // (num_pages, 2, h_kv, page_size, d): K at [., 0], V at [., 1]
  const int32_t* page_indptr;    // (batch + 1)
  const int32_t* page_values;    // (nnz_pages)
  const int32_t* last_page_len;  // (batch)
  int batch, h_q, h_kv, group, page_size;
  int slices;  // blocks a KV head's query heads are cut into: ceil(group / kHeads)
  int splits;  // runs of keys a sequence is cut into
  float scale_log2;  // sm_scale * log2(e)
  float* partial_o;   // (splits, batch, h_q, d) when splits > 1
  float* partial_ml;  // (splits, batch, h_q, 2)
  int* counters;      // (batch, h_kv * slices): zero between calls
  // kFused (attention.cu's deferred RoPE and append): the new token's q, k and v come from its
  // qkv row and are rotated here; the rotated q also goes to q_rotated (the cache's q, which a
  // forked sequence's later depths read), k and v to their slot in the pages, and the key in
  // that slot is taken from registers, not read back.
  const void* qkv;           // (batch, h_q + 2 h_kv, d)
  const int32_t* position;   // (batch): RoPE positions
  const int32_t* slot;       // (batch): page * page_size + row of the new K/V, -1 for none
  void* q_rotated;           // (batch, h_q, d)
  RopeTable rope;
};

__device__ __forceinline__ uint4 LoadStreaming(const void* p) {  // read once: skip L1
  uint4 u;
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
               : "l"(p));
  return u;
}

// Keys a key group takes per iteration (registers: fewer with more query heads).
__host__ __device__ constexpr int DecodeUnroll(int heads) { return heads >= 8 ? 2 : 4; }

// Whether a block's keys go through a ring in shared memory (cp.async) rather than registers:
// with 2 or more query heads a block, whose registers (q and the output of each head) leave
// room for fewer loads in flight. H200, 8 KV heads of 128 (bench/NOTES.md): 64 sequences of 576
// keys, 4 heads a block, 98.3 -> 68.1 us; with one head a block the ring was slower (7B shape,
// 158.7 -> 180.2 us), the registers stay.
__host__ __device__ constexpr bool DecodeRing(int heads) { return heads >= 2; }

// A block's dynamic shared memory: each warp's ring, kDecodeStages iterations of K and V rows,
// 16 bytes a lane a key (with the static merge buffers, under 48 KiB).
__host__ __device__ constexpr int DecodeRingBytes(int heads) {
  return DecodeRing(heads) ? kDecodeWarps * kDecodeStages * DecodeUnroll(heads) * 2 * 32 * 16 : 0;
}

__device__ __forceinline__ float Exp2Decode(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One online-softmax state (m, l, o) absorbs another (m2, l2, o2).
template <int H>
__device__ __forceinline__ void MergeState(float (&m)[H], float (&l)[H], float (&o)[H][8],
                                           const float (&m2)[H], const float (&l2)[H],
                                           const float (&o2)[H][8]) {
#pragma unroll
  for (int h = 0; h < H; ++h) {
    const float mx = fmaxf(m[h], m2[h]);
    const float a = Exp2Decode(m[h] - mx), b = Exp2Decode(m2[h] - mx);
    m[h] = mx;
    l[h] = l[h] * a + l2[h] * b;
#pragma unroll
    for (int j = 0; j < 8; ++j) o[h][j] = o[h][j] * a + o2[h][j] * b;
  }
}

// grid (splits, h_kv * slices, batch), kDecodeThreads threads. H: query heads per block.
template <typename T, int D, int H, bool kFused>
__global__ void __launch_bounds__(kDecodeThreads) Decode(DecodeParams p) {
  constexpr int kLanes = D / 8;            // lanes per key row
  constexpr int kGroups = 32 / kLanes;     // key groups per warp
  constexpr int kBlockGroups = kGroups * kDecodeWarps;
  constexpr int kUnroll = DecodeUnroll(H);
  constexpr bool kRing = DecodeRing(H);
  using F = Half8<T>;

  __shared__ float s_o[kDecodeWarps][H][D];
  __shared__ float s_ml[kDecodeWarps][H][2];
  __shared__ int s_last;

  const int split = blockIdx.x, b = blockIdx.z;
  const int kv_head = blockIdx.y / p.slices, slice = blockIdx.y % p.slices;
  const int head0 = kv_head * p.group + slice * H;
  const int heads = min(H, p.group - slice * H);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % kLanes;                    // which 8 elements of a row
  const int grp = warp * kGroups + lane / kLanes;   // which key group

  const int p0 = p.page_indptr[b], p1 = p.page_indptr[b + 1];
  const int len = p1 > p0 ? (p1 - p0 - 1) * p.page_size + p.last_page_len[b] : 0;
  const int per = (len + p.splits - 1) / p.splits;
  const int start = split * per, end = min(len, start + per);

  // kFused: the new token's rows of qkv (loaded here), its position and slot. Rotating them waits
  // until the first keys' loads are issued (prepare), so that the arithmetic, and the wait for
  // the position it needs, overlap the loads' round trip instead of delaying them (a warp issues
  // in order). Then the first key group of each (sequence, KV head)'s first block writes the
  // new k and v to their slot, and each first block its rotated q to q_rotated.
  const bool writer = kFused && split == 0 && grp == 0;
  const uint4 zero = make_uint4(0, 0, 0, 0);  // what the idle heads' q holds
  uint4 qraw[H], knew = zero, vnew = zero;
  int pos = 0, slot = -1;
  if constexpr (kFused) {
    const T* row = static_cast<const T*>(p.qkv) + int64_t(b) * (p.h_q + 2 * p.h_kv) * D + sub * 8;
    pos = p.position[b], slot = p.slot[b];
#pragma unroll
    for (int h = 0; h < H; ++h) {
      qraw[h] = h < heads ? *reinterpret_cast<const uint4*>(row + (head0 + h) * D) : zero;
    }
    knew = *reinterpret_cast<const uint4*>(row + (p.h_q + kv_head) * D);
    vnew = *reinterpret_cast<const uint4*>(row + (p.h_q + p.h_kv + kv_head) * D);
  } else {
#pragma unroll
    for (int h = 0; h < H; ++h) {
      const T* row = static_cast<const T*>(p.q) + (int64_t(b) * p.h_q + head0 + h) * D + sub * 8;
      qraw[h] = h < heads ? *reinterpret_cast<const uint4*>(row) : zero;
    }
  }
  float q[H][8];
  auto prepare = [&]() {
    if constexpr (kFused) {
      const RopeFactors<D> rope(sub, pos, p.rope);
      knew = rope.template Rotate<T>(knew, ShuffleXor(knew, kLanes / 2));
      if (writer && slice == 0 && slot >= 0) {
        T* at = static_cast<T*>(const_cast<void*>(p.pages)) +
                SlotOffset(slot, kv_head, p.h_kv, p.page_size, D) + sub * 8;
        *reinterpret_cast<uint4*>(at) = knew;
        *reinterpret_cast<uint4*>(at + int64_t(p.h_kv) * p.page_size * D) = vnew;
      }
#pragma unroll
      for (int h = 0; h < H; ++h) {
        qraw[h] = rope.template Rotate<T>(qraw[h], ShuffleXor(qraw[h], kLanes / 2));
        if (writer && h < heads) {
          T* at = static_cast<T*>(p.q_rotated) + (int64_t(b) * p.h_q + head0 + h) * D + sub * 8;
          *reinterpret_cast<uint4*>(at) = qraw[h];
        }
      }
    }
#pragma unroll
    for (int h = 0; h < H; ++h) {
      F::Load(q[h], qraw[h]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[h][j] = h < heads ? q[h][j] * p.scale_log2 : 0.f;
    }
  };
  float m[H], l[H], o[H][8];
#pragma unroll
  for (int h = 0; h < H; ++h) {
    m[h] = kDecodeEmptyLse, l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) o[h][j] = 0.f;
  }

  // Iteration `it` takes the keys base + u kBlockGroups + grp, base = start + it kStep. kRing:
  // they go through the warp's ring in shared memory (cp.async), iteration it in stage it %
  // kDecodeStages, so that the next one's copies are in flight while a warp computes; a lane
  // reads back only its own 16 bytes (no barrier). Else straight into registers at the top of
  // each iteration. Either way the first iteration's loads are issued before `prepare`. A key
  // past the run, or the new token's (kFused: its k and v come from registers), reads as zeros.
  extern __shared__ uint4 decode_ring[];
  uint4* ring = decode_ring + warp * kDecodeStages * kUnroll * 64;  // [stage][u][K, V][lane]
  constexpr int kStep = kBlockGroups * kUnroll;
  const int iters = end > start ? (end - start + kStep - 1) / kStep : 0;
  const T* pages = static_cast<const T*>(p.pages);
  const int64_t kv_stride = int64_t(p.h_kv) * p.page_size * D;  // K -> V of a page
  uint32_t fresh = 0;  // bit stage * kUnroll + u: that key is the new token's (kFused)
  uint4 kraw[kUnroll], vraw[kUnroll];
  auto issue = [&](int it) {
    if (it < iters) {
      const int stage = kRing ? it % kDecodeStages : 0;
      uint4* to = ring + stage * kUnroll * 64 + lane;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = start + it * kStep + u * kBlockGroups + grp;
        const T* k = pages;
        bool load = false, is_new = false;
        if (i < end) {
          const int page = p.page_values[p0 + i / p.page_size];
          is_new = kFused && page * p.page_size + i % p.page_size == slot;
          k += ((int64_t(page) * 2 * p.h_kv + kv_head) * p.page_size + i % p.page_size) * D +
               sub * 8;
          load = !is_new;
        }
        const uint32_t bit = 1u << (stage * kUnroll + u);
        fresh = is_new ? fresh | bit : fresh & ~bit;
        if constexpr (kRing) {
          CopyAsync16(SharedAddress(to + u * 64), k, load);
          CopyAsync16(SharedAddress(to + u * 64 + 32), k + kv_stride, load);
        } else {
          kraw[u] = load ? LoadStreaming(k) : zero;
          vraw[u] = load ? LoadStreaming(k + kv_stride) : zero;
        }
      }
    }
    if constexpr (kRing) CommitAsync();  // empty past the last iteration: every wait counts alike
  };
  constexpr int kAhead = kRing ? kDecodeStages - 1 : 1;  // iterations issued before the loop
#pragma unroll
  for (int it = 0; it < kAhead; ++it) issue(it);
  prepare();
  for (int it = 0; it < iters; ++it) {
    const int stage = kRing ? it % kDecodeStages : 0;
    if constexpr (kRing) {
      issue(it + kDecodeStages - 1);
      WaitAsync<kDecodeStages - 1>();  // iteration it is in
      const uint4* from = ring + stage * kUnroll * 64 + lane;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) kraw[u] = from[u * 64], vraw[u] = from[u * 64 + 32];
    } else if (it > 0) {
      issue(it);
    }
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid[u] = start + it * kStep + u * kBlockGroups + grp < end;
      if (kFused && (fresh >> (stage * kUnroll + u)) & 1) kraw[u] = knew, vraw[u] = vnew;
    }
    float s[kUnroll][H];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8];
      F::Load(k, kraw[u]);
#pragma unroll
      for (int h = 0; h < H; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) dot = fmaf(q[h][j], k[j], dot);
#pragma unroll
        for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(~0u, dot, off);
        s[u][h] = valid[u] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < H; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][h]);
      const float scale = Exp2Decode(m[h] - mx);
      m[h] = mx;
      l[h] *= scale;
#pragma unroll
      for (int j = 0; j < 8; ++j) o[h][j] *= scale;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float v[8];
      F::Load(v, vraw[u]);
#pragma unroll
      for (int h = 0; h < H; ++h) {
        const float w = Exp2Decode(s[u][h] - m[h]);  // 0 for a missing key
        l[h] += w;
#pragma unroll
        for (int j = 0; j < 8; ++j) o[h][j] = fmaf(w, v[j], o[h][j]);
      }
    }
  }

  // The warp's groups: lanes with the same `sub` hold the same elements.
#pragma unroll
  for (int off = kLanes; off < 32; off *= 2) {
    float m2[H], l2[H], o2[H][8];
#pragma unroll
    for (int h = 0; h < H; ++h) {
      m2[h] = __shfl_xor_sync(~0u, m[h], off);
      l2[h] = __shfl_xor_sync(~0u, l[h], off);
#pragma unroll
      for (int j = 0; j < 8; ++j) o2[h][j] = __shfl_xor_sync(~0u, o[h][j], off);
    }
    MergeState<H>(m, l, o, m2, l2, o2);
  }
  if (lane < kLanes) {
#pragma unroll
    for (int h = 0; h < H; ++h) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s_o[warp][h][sub * 8 + j] = o[h][j];
      if (sub == 0) s_ml[warp][h][0] = m[h], s_ml[warp][h][1] = l[h];
    }
  }
  __syncthreads();

  // The block's warps, then (with splits) the sequence's blocks: thread t takes (head, element)
  // pairs t, t + 128, ...
  T* out = static_cast<T*>(p.out);
  for (int idx = threadIdx.x; idx < H * D; idx += kDecodeThreads) {
    const int h = idx / D, d = idx % D;
    if (h >= heads) continue;
    float mx = kDecodeEmptyLse;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, s_ml[w][h][0]);
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float a = Exp2Decode(s_ml[w][h][0] - mx);
      sum += s_ml[w][h][1] * a;
      acc += s_o[w][h][d] * a;
    }
    const int64_t row = int64_t(b) * p.h_q + head0 + h;
    if (p.splits == 1) {
      out[row * D + d] = static_cast<T>(sum > 0.f ? acc / sum : 0.f);
      if (d == 0) p.lse[row] = sum > 0.f ? mx + log2f(sum) : kDecodeEmptyLse;
    } else {
      const int64_t at = int64_t(split) * p.batch * p.h_q + row;
      p.partial_o[at * D + d] = acc;
      if (d == 0) p.partial_ml[2 * at] = mx, p.partial_ml[2 * at + 1] = sum;
    }
  }
  if (p.splits == 1) return;

  // The last block of this (sequence, slice) to finish merges every split's state.
  __threadfence();
  __syncthreads();
  int* counter = p.counters + int64_t(b) * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) s_last = atomicAdd(counter, 1) == p.splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int64_t stride = int64_t(p.batch) * p.h_q;
  for (int idx = threadIdx.x; idx < H * D; idx += kDecodeThreads) {
    const int h = idx / D, d = idx % D;
    if (h >= heads) continue;
    const int64_t row = int64_t(b) * p.h_q + head0 + h;
    float mx = kDecodeEmptyLse;
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, __ldcg(p.partial_ml + 2 * (s * stride + row)));
    float sum = 0.f, acc = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const int64_t at = s * stride + row;
      const float a = Exp2Decode(__ldcg(p.partial_ml + 2 * at) - mx);
      sum += __ldcg(p.partial_ml + 2 * at + 1) * a;
      acc += __ldcg(p.partial_o + at * D + d) * a;
    }
    out[row * D + d] = static_cast<T>(sum > 0.f ? acc / sum : 0.f);
    if (d == 0) p.lse[row] = sum > 0.f ? mx + log2f(sum) : kDecodeEmptyLse;
  }
  if (threadIdx.x == 0) *counter = 0;
}

}  // namespace attention
}  // namespace kiln
