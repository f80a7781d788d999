// RoPE and the KV append (device code) for `kiln.attention.split_rope` and
// `kiln.attention.append_kv`, and the helpers the decode kernel uses to do both itself
// (flash_decode.cuh, attention.cu's "deferred" section says when).
//
// RoPE is TVM's llama_rope_with_position_map in its default form (rotate-half, every element
// rotated): element d of a q or k row at position `pos` becomes, in fp32 and rounded once,
//   x[d] cos(a) - x[d + D/2] sin(a)  (d < D/2),   x[d] cos(a) + x[d - D/2] sin(a)  (d >= D/2),
//   a = pos * inv_freq[d mod D/2],  inv_freq[i] = rope_scale / rope_theta^(2i / D)
// (RopeTable, computed by the host in double precision). The angle is reduced to [-pi, pi]
// before the fast sine and cosine (absolute error ~4e-7 there), so that its error stays the
// fp32 product's at any position, not the fast functions' (which grows with the angle).
// A lane holds 8 elements (16 bytes) of a row, sub * 8 .. sub * 8 + 7; its partner, the lane
// D / 16 subs away, holds the 8 elements D / 2 away, which share the lane's frequencies.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kiln {
namespace attention {

template <typename T>
struct Half8;  // 8 elements (16 bytes) <-> 8 floats

template <>
struct Half8<half> {
  __device__ __forceinline__ static void Load(float (&f)[8], const uint4& u) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(h[i]);
      f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static uint4 Store(const float (&f)[8]) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return u;
  }
};

template <>
struct Half8<__nv_bfloat16> {
  __device__ __forceinline__ static void Load(float (&f)[8], const uint4& u) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static uint4 Store(const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return u;
  }
};

constexpr int kMaxRopeFreqs = 64;  // D / 2, D <= 128

struct RopeTable {
  float inv_freq[kMaxRopeFreqs];
};

// The rotation of a lane's 8 elements at position `pos`: out[j] = x[j] c[j] + partner[j] s[j]
// (s carries the sign).
template <int D>
struct RopeFactors {
  float c[8], s[8];
  RopeFactors() = default;
  __device__ __forceinline__ RopeFactors(int sub, int pos, const RopeTable& table) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int d = sub * 8 + j;
      const float a = static_cast<float>(pos) * table.inv_freq[d % (D / 2)];
      const float k = rintf(a * 0.159154943091895336f);  // turns
      float r = fmaf(-k, 6.28318548202514648f, a);  // 2 pi = 6.2831854820... - 1.748e-7
      r = fmaf(k, 1.74845560007448e-7f, r);
      __sincosf(r, &s[j], &c[j]);
      if (d < D / 2) s[j] = -s[j];
    }
  }
  template <typename T>
  __device__ __forceinline__ uint4 Rotate(const uint4& own, const uint4& partner) const {
    float x[8], y[8];
    Half8<T>::Load(x, own);
    Half8<T>::Load(y, partner);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = x[j] * c[j] + y[j] * s[j];
    return Half8<T>::Store(x);
  }
};

__device__ __forceinline__ uint4 ShuffleXor(const uint4& u, int mask) {
  return make_uint4(__shfl_xor_sync(~0u, u.x, mask), __shfl_xor_sync(~0u, u.y, mask),
                    __shfl_xor_sync(~0u, u.z, mask), __shfl_xor_sync(~0u, u.w, mask));
}

// Where the K row of key slot `slot` (page * page_size + row) of KV head h is in a layer's pages
// (num_pages, 2, h_kv, page_size, D); its V row is h_kv * page_size * D elements on.
__device__ __forceinline__ int64_t SlotOffset(int slot, int h, int h_kv, int page_size, int d) {
  const int page = slot / page_size, row = slot % page_size;
  return ((int64_t(page) * 2 * h_kv + h) * page_size + row) * d;
}

struct SplitRopeParams {
  const void* qkv;         // (tokens, h_q + 2 h_kv, d): q, k and v rows of each token
  const int32_t* position;  // (tokens): RoPE position of each token
  void* q;                 // (tokens, h_q, d) out: rotated
  void* k;                 // (tokens, h_kv, d) out: rotated
  void* v;                 // (tokens, h_kv, d) out: copied
  void* pages;             // null, or the layer's pages: k and v also go to slot[token]
  const int32_t* slot;     // (tokens): page * page_size + row, -1 for none
  int tokens, h_q, h_kv, page_size;
  bool rope;
  RopeTable table;
};

constexpr int kRopeThreads = 128;

// grid (tokens, ceil((h_q + 2 h_kv) * D / 8 / kRopeThreads)): a thread per 8 elements of a
// row; a warp holds whole rows (D / 8 <= 32 lanes), so a lane's partner is in its warp.
template <typename T, int D>
__global__ void __launch_bounds__(kRopeThreads) SplitRope(SplitRopeParams p) {
  constexpr int kLanes = D / 8;
  const int heads = p.h_q + 2 * p.h_kv;
  const int t = blockIdx.y * kRopeThreads + threadIdx.x;
  const int head = min(t / kLanes, heads - 1);  // lanes past the end repeat the last row
  const int sub = t % kLanes, token = blockIdx.x;
  const T* row = static_cast<const T*>(p.qkv) + (int64_t(token) * heads + head) * D + sub * 8;
  uint4 x = *reinterpret_cast<const uint4*>(row);
  const uint4 partner = ShuffleXor(x, kLanes / 2);
  if (t / kLanes >= heads) return;
  if (p.rope && head < p.h_q + p.h_kv) {
    x = RopeFactors<D>(sub, p.position[token], p.table).template Rotate<T>(x, partner);
  }
  T* out;
  int h;
  if (head < p.h_q) {
    out = static_cast<T*>(p.q), h = head;
  } else if (head < p.h_q + p.h_kv) {
    out = static_cast<T*>(p.k), h = head - p.h_q;
  } else {
    out = static_cast<T*>(p.v), h = head - p.h_q - p.h_kv;
  }
  const int rows = head < p.h_q ? p.h_q : p.h_kv;
  *reinterpret_cast<uint4*>(out + (int64_t(token) * rows + h) * D + sub * 8) = x;
  if (p.pages == nullptr || head < p.h_q) return;
  const int slot = p.slot[token];
  if (slot < 0) return;
  const bool is_v = head >= p.h_q + p.h_kv;
  T* at = static_cast<T*>(p.pages) + SlotOffset(slot, h, p.h_kv, p.page_size, D) +
          (is_v ? int64_t(p.h_kv) * p.page_size * D : 0) + sub * 8;
  *reinterpret_cast<uint4*>(at) = x;
}

struct AppendParams {
  const void* k;        // (tokens, h_kv, d)
  const void* v;        // (tokens, h_kv, d)
  void* pages;          // (num_pages, 2, h_kv, page_size, d)
  const int32_t* slot;  // (tokens): page * page_size + row, -1 for none
  int tokens, h_kv, page_size;
};

// grid (tokens, ceil(h_kv * D / 8 / kRopeThreads)): a thread per 8 elements of a K and a V row.
template <typename T, int D>
__global__ void __launch_bounds__(kRopeThreads) AppendKV(AppendParams p) {
  constexpr int kLanes = D / 8;
  const int t = blockIdx.y * kRopeThreads + threadIdx.x;
  const int h = t / kLanes, sub = t % kLanes, token = blockIdx.x;
  if (h >= p.h_kv) return;
  const int slot = p.slot[token];
  if (slot < 0) return;
  const int64_t from = (int64_t(token) * p.h_kv + h) * D + sub * 8;
  T* at = static_cast<T*>(p.pages) + SlotOffset(slot, h, p.h_kv, p.page_size, D) + sub * 8;
  *reinterpret_cast<uint4*>(at) = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.k) + from);
  *reinterpret_cast<uint4*>(at + int64_t(p.h_kv) * p.page_size * D) =
      *reinterpret_cast<const uint4*>(static_cast<const T*>(p.v) + from);
}

}  // namespace attention
}  // namespace kiln
