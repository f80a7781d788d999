// Kiln's decode GEMVs for CUDA (sm_80 and newer): `kiln.gemv.q4`, `kiln.gemv.q4_swiglu`
// and `kiln.gemv.f16_swiglu`, destination-passing (the caller allocates `out`, passed last), and
// the batched decode's q4, `kiln.gemv.q4_batched` (Q4Gemm below and Q4Batched say how), and a
// mixture of experts' MLP reading only the routed experts, `kiln.gemv.q4_moe_swiglu` and
// `kiln.gemv.q4_moe` (Q4MoeSwiGLU, Q4MoeDown and CheckMoe say how), and its router,
// `kiln.gemv.moe_route` (MoeRoute).
//
//   q4(x (..., K) f16, qweight (N, K / 8) u32, scale (N, K / 32) f16, out (..., N) f16)
//   q4_swiglu(x, qweight (2I, K / 8), scale (2I, K / 32), out (..., I) f16)
//   f16_swiglu(x, w (2I, K) f16, out (..., I) f16)
//   q4_batched(x, qweight, scale, out, w (N, K) f16 scratch)
//   q4_moe_swiglu(x, gate (..., E) f16, qweight_0, scale_0, ..., out (E, ..., I) f16)
//   q4_moe(h (E, ..., K), gate, qweight_0, scale_0, ..., out (..., N) f16)
//   moe_route(x (..., K) f16, gate (E, K) f16, top_k, out (..., E) f16): the router (MoeRoute)
//   add_rms_norm(x, r (..., H) f16, w (H) f16, epsilon, s, y (..., H) f16): s = x + r and
//                y = rms_norm(s) w in one read of x and r (AddRMSNorm)
//
// M = the product of x's leading dimensions; K % 32 == 0. A GEMV kernel takes 8 rows of x at most
// (the MMA's 8 columns); more run as one kernel per 8 rows, each reading the weight again. The q4
// weight is TVM's q4f16 storage: w[n, k] = (nib - 8) * scale[n, k / 32], nib = (qweight[n, k / 8]
// >> 4 (k % 8)) & 15 (eight values per word, lowest nibble first, one fp16 scale per 32 values
// along K).
// q4: out[m, n] = sum_k x[m, k] w[n, k]. The SwiGLU forms read the MLP's gate rows [0, I) and up
// rows [I, 2I) in one kernel (a block computes gate row j and up row I + j, nothing goes through
// memory between them): out[m, j] = silu(a) b, a = x[m] . w[j], b = x[m] . w[I + j], silu(a) =
// a / (1 + exp(-a)).
//
// Numerics: the products and their sums are fp32, on the tensor cores (mma.sync m16n8k16, fp16
// inputs, fp32 accumulators); each result is rounded to fp16 once. A q4 weight enters the MMA
// as fp16((nib - 8) * scale), the weight TVM's q4f16 dequantize makes (one rounding, relative
// 2^-11 at most); nib - 8 itself is exact (the magic-number dequantize below). So nothing is
// accumulated in fp16, and an activation that fp16 holds cannot overflow a partial sum.
//
// Layout of the work: a block is 8 warps and owns 16 or 32 weight rows (one or two tiles); its
// warps split K and add their partial sums through shared memory at the end. Which, and whether
// warps prefetch (below), is the variant (kVariants); DefaultVariant picks one per shape. Each warp
// treats its rows as the MMA's A (16 rows x 16 k) and x as B (16 k x 8 columns, one per row m of x:
// the m >= M columns are computed and dropped). The order of k inside an MMA is free as long as A
// and B agree, so each lane takes whole 16-byte pieces of the weight rows: for q4, lane (g =
// lane / 4, c = lane % 4) reads, for the rows g and g + 8 of the tile, group 4 s + c of sub-step s
// (one uint4, 32 values: the quad's four lanes read 64 contiguous bytes of a row, two full
// sectors), and the x values of the same k in the order the dequantize produces them. Weights are
// streamed past L1 (ld.global.nc.L1::no_allocate); x (M K halves, which every block reads) is
// cached in L1. A warp issues the loads of a super-step, four sub-steps (16 groups, 512 values of
// K), before it uses them: 4 KB of weights in flight per tile, 32 KB per block (64 KB with two
// tiles); and the 512 x values of each row of x go to shared memory with them (cp.async), waited
// for at their first use. (f16 SwiGLU loads four steps of 32 values, weights and x, into registers:
// 8 KB a warp.) The warps of a block take super-steps in turn, so together they read 2 KB of each
// row at once (for q4 at K = 4096, the whole row). Prefetching variants issue a warp's next
// super-step's weight loads before the MMAs of the current one.
//
// Runs on TVM's current stream for the device (TVMFFIEnvGetStream), as attention.cu does.

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../cuda_extern.cuh"

namespace kiln {
namespace gemv {

using tvm::ffi::Tensor;

constexpr int kWarps = 8;  // per block; they split K
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;    // rows of one tile (the MMA's M)
constexpr int kMaxM = 8;     // columns of the MMA's B: rows of x
constexpr int kSubSteps = 4;  // q4: sub-steps of 4 groups (128 values) a warp loads at once
constexpr int kF16Steps = 4;  // f16: steps of 32 values a warp loads at once
// q4: a warp's x values for one super-step (512 per row of x), in shared memory; rows 16 bytes
// apart in banks, so that 8 rows of x read in one instruction do not collide
constexpr int kXStride = 512 + 8;
constexpr int kXBytesPerRow = kWarps * kXStride * 2;  // per row of x, a block

// ---------------------------------------------------------------------------------------------
// Device helpers

// 16 bytes read once (weights): not kept in L1, so that x stays there.
__device__ __forceinline__ uint4 LoadStreaming(const void* p) {
  uint4 v;  // volatile: never hoisted above the loop's bound check (the pointer runs past K)
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 LoadCached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 16 bytes global -> shared, asynchronously; with `valid` false, 16 zero bytes and no read.
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool valid) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void WaitAsync() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ uint4 LoadShared(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// The sum of a warp's 32 values, in every lane (the same butterfly order in each).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(~0u, v, off);
  return v;
}

template <int kLut>
__device__ __forceinline__ uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
}

__device__ __forceinline__ uint32_t AddHalf2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("add.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t MulHalf2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t FmaHalf2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// d (16x8 fp32) += a (16x16 fp16, row-major) * b (16x8 fp16, column-major)
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One word of eight nibbles v0..v7 -> four fp16 pairs (v_i - 8) * s, i = (0, 4), (1, 5), (2, 6),
// (3, 7) (first in the low half), `scale2` = (s, s). (w & 0x000F000F) | 0x64006400 reads as the
// halves (1024 + v0, 1024 + v4), and minus 1032 is v - 8, exactly; the nibbles at bits 4-7 and
// 20-23 give 1024 + 16 v, and (1024 + 16 v) / 16 - 72 is v - 8, exactly, in one FMA.
constexpr uint32_t kLowNibbles = 0x000F000F, kHighNibbles = 0x00F000F0, kMagic = 0x64006400;
constexpr uint32_t kMinus1032 = 0xE408E408, kSixteenth = 0x2C002C00, kMinus72 = 0xD480D480;
constexpr int kAndOr = (0xF0 & 0xCC) | 0xAA;  // lop3: (a & b) | c

__device__ __forceinline__ void Dequantize(uint32_t w, uint32_t scale2, uint32_t (&h)[4]) {
  const uint32_t w8 = w >> 8;
  h[0] = MulHalf2(AddHalf2(Lop3<kAndOr>(w, kLowNibbles, kMagic), kMinus1032), scale2);
  h[1] = MulHalf2(FmaHalf2(Lop3<kAndOr>(w, kHighNibbles, kMagic), kSixteenth, kMinus72), scale2);
  h[2] = MulHalf2(AddHalf2(Lop3<kAndOr>(w8, kLowNibbles, kMagic), kMinus1032), scale2);
  h[3] = MulHalf2(FmaHalf2(Lop3<kAndOr>(w8, kHighNibbles, kMagic), kSixteenth, kMinus72), scale2);
}

// x0..x7 (natural order, two per word) -> the pairs (0, 4), (1, 5), (2, 6), (3, 7) Dequantize
// gives the weights in.
__device__ __forceinline__ void PairUp(const uint4& x, uint32_t (&b)[4]) {
  b[0] = __byte_perm(x.x, x.z, 0x5410);
  b[1] = __byte_perm(x.x, x.z, 0x7632);
  b[2] = __byte_perm(x.y, x.w, 0x5410);
  b[3] = __byte_perm(x.y, x.w, 0x7632);
}

// The scales of one row for a super-step t: sub-step u uses group 16 t + 4 u + c. Loaded first
// (Scales::Load, with the weights), then paired (Scales::Pair: (s, s) per sub-step). kVector
// (groups per row a multiple of 8, 16-byte aligned rows): the quad's lanes read the 16 scales
// in one 32-byte request (lanes c = 0, 2 the first half, 1, 3 the second) and swap the words
// the other needs; else each lane reads its four. A group past K gets 0.
template <bool kVector>
struct Scales {
  uint32_t raw[4];

  __device__ __forceinline__ void Load(const half* row, int t, int groups, int c) {
    const int first = 16 * t;
    if constexpr (kVector) {
      const int p = c & 1;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (first + 8 * p < groups) v = LoadCached(row + first + 8 * p);
      raw[0] = v.x, raw[1] = v.y, raw[2] = v.z, raw[3] = v.w;
    } else {
#pragma unroll
      for (int u = 0; u < kSubSteps; ++u) {
        const int group = first + 4 * u + c;
        raw[u] = 0;
        if (group < groups) raw[u] = __ldg(reinterpret_cast<const unsigned short*>(row) + group);
      }
    }
  }

  __device__ __forceinline__ void Pair(int c, uint32_t (&s2)[kSubSteps]) const {
    if constexpr (kVector) {
      // raw: the halves 0..7 (p = 0) or 8..15 (p = 1) of the super-step's 16; this lane and
      // its partner (lane ^ 1) need the words q and 2 + q of each half.
      const int p = c & 1, q = c >> 1;
      const uint32_t mine0 = q ? raw[1] : raw[0], mine1 = q ? raw[3] : raw[2];
      const uint32_t other0 = __shfl_xor_sync(0xffffffff, mine0, 1);
      const uint32_t other1 = __shfl_xor_sync(0xffffffff, mine1, 1);
      // Element 4 u + c of the 16: u = 0, 1 from the first half, 2, 3 from the second; half p
      // of its word, repeated in both halves of the result.
      const uint32_t first_half = p ? 0x7676 : 0x1010, second_half = p ? 0x3232 : 0x5454;
      s2[0] = __byte_perm(mine0, other0, first_half);
      s2[1] = __byte_perm(mine1, other1, first_half);
      s2[2] = __byte_perm(mine0, other0, second_half);
      s2[3] = __byte_perm(mine1, other1, second_half);
    } else {
#pragma unroll
      for (int u = 0; u < kSubSteps; ++u) s2[u] = raw[u] | (raw[u] << 16);
    }
  }
};

__device__ __forceinline__ float Silu(float a) { return a / (1.0f + __expf(-a)); }

// Outputs of a block: q4, 16 per tile; SwiGLU, 8 per tile: with two tiles, tile 0 holds the
// gate rows and tile 1 the up rows of 16 outputs; with one, its rows 0..7 are the gate rows and
// 8..15 the up rows of 8 outputs (so that SwiGLU streams 16 weight rows a block as q4 does).
template <int kTiles, bool kSwiGLU>
__host__ __device__ constexpr int OutputsPerBlock() {
  return kSwiGLU ? kTiles * kRows / 2 : kTiles * kRows;
}

// Adds the warps' partial 16 x 8 tiles and writes the block's outputs (OutputsPerBlock). The
// block's weight rows, tile by tile, are "flat" rows 0 .. 16 kTiles - 1: q4's output r is flat
// row r; SwiGLU's output r has its gate at flat row r and its up at r + 8 kTiles.
template <int kTiles, bool kSwiGLU>
__device__ __forceinline__ void Finish(float (&acc)[kTiles][4], half* out, int first, int rows,
                                       int m_rows) {
  __shared__ __align__(16) float partial[kWarps][kTiles * kRows][kMaxM];  // float2 stores
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    *reinterpret_cast<float2*>(&partial[warp][i * kRows + g][2 * c]) =
        make_float2(acc[i][0], acc[i][1]);
    *reinterpret_cast<float2*>(&partial[warp][i * kRows + g + 8][2 * c]) =
        make_float2(acc[i][2], acc[i][3]);
  }
  __syncthreads();
  constexpr int kOutRows = OutputsPerBlock<kTiles, kSwiGLU>();
  for (int e = threadIdx.x; e < kOutRows * kMaxM; e += kThreads) {
    const int r = e % kOutRows, m = e / kOutRows;
    if (m >= m_rows || first + r >= rows) continue;
    float sum[kSwiGLU ? 2 : 1] = {};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum[0] += partial[w][r][m];
      if constexpr (kSwiGLU) sum[1] += partial[w][r + 8 * kTiles][m];
    }
    float value = sum[0];
    if constexpr (kSwiGLU) value = Silu(sum[0]) * sum[1];
    out[static_cast<int64_t>(m) * rows + first + r] = __float2half_rn(value);
  }
}

struct Args {
  const half* x;     // (M, K)
  const void* w;     // q4: (N, K / 8) uint32; f16: (N, K) half
  const half* scale;  // q4: (N, K / 32)
  half* out;         // (M, rows): rows = N, or N / 2 for SwiGLU
  int m_rows, k, rows;
};

// The weight row of tile i's row `r` (0..15) for the block's outputs from `first` (Finish says
// which rows a block has). Rows past the end read the last one (their results are dropped), so
// that no load needs a bounds check.
template <int kTiles, bool kSwiGLU>
__device__ __forceinline__ int64_t WeightRow(int first, int i, int r, int rows) {
  if constexpr (kSwiGLU && kTiles == 2) {
    return min(first + r, rows - 1) + static_cast<int64_t>(i) * rows;
  } else if constexpr (kSwiGLU) {
    return min(first + r % 8, rows - 1) + static_cast<int64_t>(r / 8) * rows;
  }
  return min(first + i * kRows + r, rows - 1);
}

// ---------------------------------------------------------------------------------------------
// q4 (and q4 SwiGLU): kTiles tiles of 16 rows per block. A warp's super-step t is the groups
// 16 t .. 16 t + 15 of its rows (lane c: 16 t + 4 u + c in sub-step u); its x values 512 t ..
// 512 t + 511 of each row go to the warp's `xs` (rows kXStride apart). kFull: all of them are
// in K; else a group past K reads the last one again, with scale 0 and x 0.

// A super-step's weights and scales, in a warp's registers.
template <int kTiles, bool kVectorScales>
struct Q4Step {
  uint4 q[kSubSteps][kTiles][2];
  Scales<kVectorScales> scales[kTiles][2];
};

// x's values of super-step t -> xs (cp.async, one commit group).
template <bool kFull>
__device__ __forceinline__ void Q4CopyX(half* xs, const half* x, int t, const Args& a,
                                        int lane) {
  for (int i = lane; i < a.m_rows * 64; i += 32) {  // 64 pieces of 16 bytes a row
    const int m = i / 64, k = 512 * t + 8 * (i % 64);
    CopyAsync16(xs + m * kXStride + 8 * (i % 64), x + static_cast<int64_t>(m) * a.k + k,
                kFull || k < a.k);
  }
  CommitAsync();
}

// Issues the loads of super-step t's weights and scales; `w` points at the lane's group c of
// its rows (one uint4 a group).
template <int kTiles, bool kVectorScales, bool kFull>
__device__ __forceinline__ void Q4Load(Q4Step<kTiles, kVectorScales>& s,
                                       const uint4* const (&w)[kTiles][2],
                                       const half* const (&srow)[kTiles][2], int t, int groups,
                                       int c) {
  int offset[kSubSteps];  // groups from the lane's group c
#pragma unroll
  for (int u = 0; u < kSubSteps; ++u) {
    offset[u] = 16 * t + (kFull ? 4 * u : min(4 * u, groups - 1 - (16 * t + c)));
  }
#pragma unroll
  for (int u = 0; u < kSubSteps; ++u) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) s.q[u][i][h] = LoadStreaming(w[i][h] + offset[u]);
    }
  }
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) s.scales[i][h].Load(srow[i][h], t, groups, c);
  }
}

// The MMAs of a super-step whose loads Q4Load and Q4CopyX issued; waits for x (every cp.async
// group of the warp) at its first use.
template <int kTiles, int kChains, bool kVectorScales>
__device__ __forceinline__ void Q4Compute(float (&acc)[kTiles][kChains][4],
                                          const Q4Step<kTiles, kVectorScales>& s,
                                          const half* xs, const Args& a, int lane) {
  const int g = lane / 4, c = lane % 4;
  uint32_t s2[kTiles][2][kSubSteps];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) s.scales[i][h].Pair(c, s2[i][h]);
  }
  const half* xg = xs + min(g, a.m_rows - 1) * kXStride + 32 * c;  // lane's row of x, group c
#pragma unroll
  for (int u = 0; u < kSubSteps; ++u) {
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      uint32_t wl[kTiles][4], wh[kTiles][4];  // rows g and g + 8
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        Dequantize(reinterpret_cast<const uint32_t*>(&s.q[u][i][0])[word], s2[i][0][u], wl[i]);
        Dequantize(reinterpret_cast<const uint32_t*>(&s.q[u][i][1])[word], s2[i][1][u], wh[i]);
      }
      if (u == 0 && word == 0) {  // x, loading since the start: waited for as late as can be
        WaitAsync();
        __syncwarp();
      }
      uint32_t b[4];
      PairUp(LoadShared(xg + 128 * u + 8 * word), b);
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        float(&d)[4] = acc[i][word % kChains];  // kChains sums, so that MMAs overlap
        Mma(d, wl[i][0], wh[i][0], wl[i][1], wh[i][1], b[0], b[1]);
        Mma(d, wl[i][2], wh[i][2], wl[i][3], wh[i][3], b[2], b[3]);
      }
    }
  }
  __syncwarp();  // every lane has read xs before the next super-step writes it
}

// Blocks per SM the launch bounds ask for (registers: 80, 128 or 255 a thread). A prefetching
// warp holds two super-steps' weights in registers.
constexpr int Q4MinBlocks(int tiles, bool prefetch) {
  return prefetch ? (tiles == 1 ? 2 : 1) : (tiles == 1 ? 3 : 2);
}

// kPrefetch: a warp issues the loads of its next super-step (t + kWarps) before the MMAs of
// this one, so that its weights stream while it computes (two super-steps in flight: 8 KB a
// tile); x's next values go to xs after the MMAs (from L2, while the weights are on their way).
// Without it, a warp loads a super-step and then computes it.
// Dynamic shared memory: kXBytesPerRow a row of x.
//
// Q4BlockSums is a block's K loop: its warps' partial sums (one 16 x 8 tile each per weight
// tile) for the weight rows of the outputs from `first`; `xs` is the warp's part of the dynamic
// shared memory. Q4Gemv adds them up and writes them (Finish).
template <int kTiles, bool kSwiGLU, bool kVectorScales, bool kPrefetch>
__device__ __forceinline__ void Q4BlockSums(const Args& a, int first, half* xs,
                                            float (&sums)[kTiles][4]) {
  constexpr int kChains = kTiles == 1 ? 2 : 1;  // independent MMA sums per tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int groups = a.k / 32;
  const uint4* w[kTiles][2];  // rows g and g + 8 of each tile (one uint4 a group), at group c
  const half* srow[kTiles][2];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = WeightRow<kTiles, kSwiGLU>(first, i, g + 8 * h, a.rows);
      w[i][h] = static_cast<const uint4*>(a.w) + row * groups + c;
      srow[i][h] = a.scale + row * groups;
    }
  }
  float acc[kTiles][kChains][4] = {};
  const int full = groups / 16;  // super-steps wholly in K
  using Step = Q4Step<kTiles, kVectorScales>;
  if constexpr (kPrefetch) {
    const int steps = (groups + 15) / 16;  // the last one maybe partial: all of them clamped
    Step current;
    if (warp < steps) {
      Q4CopyX<false>(xs, a.x, warp, a, lane);
      Q4Load<kTiles, kVectorScales, false>(current, w, srow, warp, groups, c);
    }
    for (int t = warp; t < steps; t += kWarps) {
      const int next_t = t + kWarps;
      Step next;
      if (next_t < steps) Q4Load<kTiles, kVectorScales, false>(next, w, srow, next_t, groups, c);
      Q4Compute<kTiles, kChains, kVectorScales>(acc, current, xs, a, lane);
      if (next_t < steps) Q4CopyX<false>(xs, a.x, next_t, a, lane);
      current = next;
    }
  } else {
    int t = warp;
    for (; t < full; t += kWarps) {
      Step s;
      Q4CopyX<true>(xs, a.x, t, a, lane);
      Q4Load<kTiles, kVectorScales, true>(s, w, srow, t, groups, c);
      Q4Compute<kTiles, kChains, kVectorScales>(acc, s, xs, a, lane);
    }
    if (t == full && 16 * full < groups) {
      Step s;
      Q4CopyX<false>(xs, a.x, t, a, lane);
      Q4Load<kTiles, kVectorScales, false>(s, w, srow, t, groups, c);
      Q4Compute<kTiles, kChains, kVectorScales>(acc, s, xs, a, lane);
    }
  }
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sums[i][j] = acc[i][0][j];
#pragma unroll
      for (int chain = 1; chain < kChains; ++chain) sums[i][j] += acc[i][chain][j];
    }
  }
}

// The warp's part of the dynamic shared memory (x's values of its super-step).
__device__ __forceinline__ half* WarpXs(int m_rows) {
  extern __shared__ uint4 dynamic_smem[];
  return reinterpret_cast<half*>(dynamic_smem) + threadIdx.x / 32 * m_rows * kXStride;
}

template <int kTiles, bool kSwiGLU, bool kVectorScales, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, Q4MinBlocks(kTiles, kPrefetch)) Q4Gemv(Args a) {
  const int first = blockIdx.x * OutputsPerBlock<kTiles, kSwiGLU>();
  float sums[kTiles][4];
  Q4BlockSums<kTiles, kSwiGLU, kVectorScales, kPrefetch>(a, first, WarpXs(a.m_rows), sums);
  Finish<kTiles, kSwiGLU>(sums, a.out, first, a.rows, a.m_rows);
}

// ---------------------------------------------------------------------------------------------
// A mixture of experts' MLP for a few rows of x (the batch-1 decode), reading only the weights of
// the experts the rows are routed to. `gate` (M, E) holds each row's weight for each expert, 0
// where the router did not choose it (Kiln's models compute it so; an expert whose every row has
// weight 0 is skipped, which is exact: its output would be multiplied by 0). Two kernels, each
// the GEMV above (16 weight rows a block, no prefetch) whose blocks walk the routed experts in
// turn (a block per expert and output tile would launch mostly blocks that find their expert
// unrouted: at batch 1, 6 of Mixtral's 8):
//   Q4MoeSwiGLU: h[e] = silu(x @ gate_e^T) * (x @ up_e^T) for each routed e; h[e] of an expert
//                no row is routed to is not written (nor read after).
//   Q4MoeDown:   out[m] = sum over routed e of gate[m, e] (h[e][m] @ down_e^T): a block walks the
//                routed experts' K loops in turn and adds their sums, weighted, in fp32 before
//                its one rounding (the unfused graph rounds each expert's output to fp16).
constexpr int kMaxExperts = 16;
static_assert(kMaxExperts <= 32, "RoutedExperts gives each expert a lane");

struct MoeArgs {
  Args a;            // one expert's Linear: x (SwiGLU) or h (the down's, expert e's at e M K),
                     // out (h: expert e's at e M rows), m_rows, k, rows; a.w, a.scale unused
  const half* gate;  // (M, experts)
  const void* w[kMaxExperts];
  const half* scale[kMaxExperts];
  int experts;
};

// The experts some row of x is routed to, a bit each (the same in every warp of the grid): a
// lane per expert reads its gate column, so that a block waits for one load, not one an expert.
__device__ __forceinline__ uint32_t RoutedExperts(const MoeArgs& m) {
  const int lane = threadIdx.x % 32;
  bool routed = false;
  if (lane < m.experts) {
    for (int r = 0; r < m.a.m_rows; ++r) {
      routed |= __half2float(m.gate[r * m.experts + lane]) != 0.0f;
    }
  }
  return __ballot_sync(0xffffffffu, routed);
}

template <bool kVectorScales>
__global__ void __launch_bounds__(kThreads, Q4MinBlocks(1, false)) Q4MoeSwiGLU(MoeArgs m) {
  const int first = blockIdx.x * OutputsPerBlock<1, true>();
  for (uint32_t routed = RoutedExperts(m); routed != 0; routed &= routed - 1) {
    const int e = __ffs(routed) - 1;
    Args a = m.a;
    a.w = m.w[e];
    a.scale = m.scale[e];
    a.out += static_cast<int64_t>(e) * a.m_rows * a.rows;
    float sums[1][4];
    Q4BlockSums<1, true, kVectorScales, false>(a, first, WarpXs(a.m_rows), sums);
    Finish<1, true>(sums, a.out, first, a.rows, a.m_rows);
    __syncthreads();  // Finish's shared sums are read before the next expert's are written
  }
}

template <bool kVectorScales>
__global__ void __launch_bounds__(kThreads, Q4MinBlocks(1, false)) Q4MoeDown(MoeArgs m) {
  const int c = threadIdx.x % 32 % 4;
  const int first = blockIdx.x * OutputsPerBlock<1, false>();
  float total[1][4] = {};
  for (uint32_t routed = RoutedExperts(m); routed != 0; routed &= routed - 1) {
    const int e = __ffs(routed) - 1;
    Args a = m.a;
    a.x += static_cast<int64_t>(e) * a.m_rows * a.k;
    a.w = m.w[e];
    a.scale = m.scale[e];
    float sums[1][4];
    Q4BlockSums<1, false, kVectorScales, false>(a, first, WarpXs(a.m_rows), sums);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the lane's sums are of the rows of x (columns) 2 c, 2 c + 1
      const int row = 2 * c + (j & 1);
      const float weight = row < a.m_rows ? __half2float(m.gate[row * m.experts + e]) : 0.0f;
      total[0][j] += weight * sums[0][j];
    }
  }
  Finish<1, false>(total, m.a.out, first, m.a.rows, m.a.m_rows);
}

// The mixture's router for a row of x a block (kiln.models.mixtral's MixtralMoE): logits l =
// x @ gate^T (fp32 sums, each rounded to fp16 as the graph's matmul writes them), p = softmax(l)
// in fp32, the top k of p (ties to the lower index) renormalized over the k: out[m, e] = p_e /
// (the sum of the chosen k p), 0 for the others. The block's warps take (expert, slice of K)
// items, 16 bytes of x and of the gate row a lane a load; then warp 0 does the rest, a lane an
// expert, through shuffles. One kernel for what the graph runs as seven (the matmul, the
// softmax's two, the ranking, the selection, the sum, the division): 4.2 us a call on an H100
// at Mixtral's shape (E = 8, K = 4096), against ~10 for the seven. (With 16 warps, 5.25 us;
// with one thread doing the rest over an array of E values, 7.2.)
constexpr int kRouteWarps = 32;

__global__ void __launch_bounds__(kRouteWarps * 32)
    MoeRoute(const half* __restrict__ x, const half* __restrict__ gate, half* __restrict__ out,
             int k, int experts, int top_k, int slices) {
  __shared__ float partial[kRouteWarps][kMaxExperts];  // [slice][expert]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const half* row = x + static_cast<int64_t>(blockIdx.x) * k;
  const int span = k / slices;  // a multiple of 8: whole 16-byte pieces
  for (int item = warp; item < experts * slices; item += kRouteWarps) {
    const int e = item % experts, s = item / experts;
    const half* a = row + s * span;
    const half* b = gate + static_cast<int64_t>(e) * k + s * span;
    float sum = 0.0f;
#pragma unroll 4
    for (int i = lane * 8; i < span; i += 32 * 8) {
      const uint4 va = *reinterpret_cast<const uint4*>(a + i);
      const uint4 vb = *reinterpret_cast<const uint4*>(b + i);
      const half2* ha = reinterpret_cast<const half2*>(&va);
      const half2* hb = reinterpret_cast<const half2*>(&vb);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 fa = __half22float2(ha[j]), fb = __half22float2(hb[j]);
        sum += fa.x * fb.x + fa.y * fb.y;
      }
    }
    sum = WarpSum(sum);
    if (lane == 0) partial[s][e] = sum;
  }
  __syncthreads();
  if (warp != 0) return;
  // Warp 0, a lane an expert: its logit, the softmax and its rank through shuffles.
  const bool mine = lane < experts;
  float l = 0.0f;
  for (int s = 0; mine && s < slices; ++s) l += partial[s][lane];
  l = mine ? __half2float(__float2half(l)) : -INFINITY;
  float most = l;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) most = fmaxf(most, __shfl_xor_sync(0xffffffffu, most, o));
  float p = mine ? expf(l - most) : 0.0f;
  p /= WarpSum(p);
  int above = 0;  // experts ranked above this one: a higher p, or an equal one at a lower index
  for (int j = 0; j < experts; ++j) {
    const float q = __shfl_sync(0xffffffffu, p, j);
    above += q > p || (q == p && j < lane);
  }
  const bool chosen = mine && above < top_k;
  const float kept = WarpSum(chosen ? p : 0.0f);
  if (mine) {
    out[static_cast<int64_t>(blockIdx.x) * experts + lane] = __float2half(chosen ? p / kept : 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// q4 for a batched decode's 9 to 64 rows of x: one kernel that reads each weight once for all of
// them (the GEMV above reads it again for every 8). A block owns 256 weight rows, kTiles 16-row
// tiles (the MMA's A) a warp: 8 warps of 32 rows or 16 of 16. All of them walk the same K a
// sub-step (128 values) at a time, through a ring of kGemmStages stages in shared memory that
// cp.async fills kGemmStages - 1 sub-steps ahead: the block's weights (16 KB a sub-step), their
// scales and x. So x serves 256 rows (every 16 bytes of it a lane reads feed kTiles x 2 MMAs),
// each dequantized weight feeds kNT MMAs (one per 8 rows of x), and 48 KB of weights a block are
// in flight. A lane's weights and their k order are the GEMV's (group c of each sub-step, rows g
// and g + 8 of each tile); each thread pairs up the pieces of x it copied once they are in
// (PairUp's order), so that a lane's B fragments are one 16-byte shared load. Sub-steps past K
// (K % 128 != 0) read the last group again against x = 0 and scale 0. K is split over blockIdx.y
// (`splits`, so that the grid fills the GPU): each split writes its fp32 sums to `partial`
// (splits, M, N) and the last of a column of blocks to finish (an atomic counter, which it
// resets) adds them and writes out.

constexpr int kGemmRows = 256;  // weight rows a block
constexpr int kGemmMaxM = 64;   // rows of x a kernel: 8 MMA column tiles
constexpr int kGemmStages = 4;
// A stage's x: 128 values of each row. The lane (g, c) reads, for word w, the 16 bytes of values
// 32 c + 8 w .. + 7 (the GEMV's order) of row g of a column tile: they sit at 16-byte unit
// 4 w + c of the row, and rows are 20 units apart, so that the 8 lanes of a phase of a 16-byte
// shared load (g = 2p, 2p + 1; c = 0..3) hit 8 distinct bank groups. The weights: 64 bytes a row
// (4 groups), rows in order (a phase reads 2 whole rows); the scales: 4 a row.
constexpr int kGemmXStride = 20 * 8;  // halves
constexpr int kGemmWBytes = kGemmRows * 64, kGemmSBytes = kGemmRows * 8;

struct GemmArgs {
  const half* x;       // (M, K)
  const uint4* w;      // (N, K / 32) groups of 32 nibbles
  const half* scale;   // (N, K / 32)
  half* out;           // (M, N)
  float* partial;      // (splits, M, N) when splits > 1
  int* counters;       // one per column of blocks, zero between calls
  int m_rows, k, rows, splits;
  bool scales8;     // K / 32 a multiple of 4 and scale 8-byte aligned: a row's 4 scales in one copy
  bool vector_out;  // N a multiple of 4 and out 8-byte aligned: the splits added 4 outputs at once
};

template <int kNT>
__host__ __device__ constexpr int GemmStageBytes() {
  return kGemmWBytes + kGemmSBytes + 8 * kNT * kGemmXStride * 2;
}

// 16 and 8 bytes global -> shared, asynchronously, with L2 asked to fetch the 256 bytes around
// them: the next sub-steps' pieces of a row (a sub-step reads 64 bytes of each weight row and 8
// of its scales) are then in L2, and DRAM serves whole 256-byte pieces.
__device__ __forceinline__ void CopyAsync16Row(void* dst, const void* src) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(to), "l"(src));
}

__device__ __forceinline__ void CopyAsync8(void* dst, const void* src) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global.L2::256B [%0], [%1], 8;\n" ::"r"(to), "l"(src));
}

// kTiles 16-row tiles a warp: kGemmRows / (16 kTiles) warps a block.
template <int kTiles>
__host__ __device__ constexpr int GemmThreads() {
  return 32 * kGemmRows / (kRows * kTiles);
}

// Blocks an SM holds (shared memory: 4 stages of x for 8 kNT rows, and registers).
template <int kNT, int kTiles>
__host__ __device__ constexpr int GemmBlocksPerSm() {
  return kTiles == 2 && kNT <= 4 ? 2 : 1;
}

// The end of a Q4Gemm block (and of an unsplit Q4Wgmma one): `sums(put)` calls put(n, m, sum)
// for each of the thread's sums (weight row n, row of x m). Unsplit, they are rounded into out;
// split, written to the split's partial sums, and the last block of the column to finish adds
// the splits' sums.
template <int kThreadsPerBlock, typename Sums>
__device__ __forceinline__ void GemmFinish(const GemmArgs& a, int block_first, Sums sums) {
  const bool alone = a.splits == 1;
  float* mine = a.partial + static_cast<int64_t>(blockIdx.y) * a.m_rows * a.rows;
  sums([&](int n, int m, float sum) {
    if (m >= a.m_rows || n >= a.rows) return;
    const int64_t at = static_cast<int64_t>(m) * a.rows + n;
    if (alone) {
      a.out[at] = __float2half_rn(sum);
    } else {
      mine[at] = sum;
    }
  });
  if (alone) return;
  __shared__ bool last;
  __threadfence();  // this block's sums are visible before its count
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&a.counters[blockIdx.x], 1) == a.splits - 1;
    if (last) a.counters[blockIdx.x] = 0;  // for the next call
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int width = min(kGemmRows, a.rows - block_first);
  const int64_t split_stride = static_cast<int64_t>(a.m_rows) * a.rows;
  if (a.vector_out) {  // 4 outputs a thread: float4 loads, one 8-byte store
    for (int e = 4 * threadIdx.x; e < a.m_rows * width; e += 4 * kThreadsPerBlock) {
      const int64_t at = static_cast<int64_t>(e / width) * a.rows + block_first + e % width;
      float4 sum = make_float4(0, 0, 0, 0);
#pragma unroll 8
      for (int s = 0; s < a.splits; ++s) {
        const float4 v = __ldcg(reinterpret_cast<const float4*>(a.partial + s * split_stride + at));
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      }
      const __half2 lo = __floats2half2_rn(sum.x, sum.y), hi = __floats2half2_rn(sum.z, sum.w);
      *reinterpret_cast<uint2*>(a.out + at) = make_uint2(*reinterpret_cast<const uint32_t*>(&lo),
                                                         *reinterpret_cast<const uint32_t*>(&hi));
    }
    return;
  }
  for (int e = threadIdx.x; e < a.m_rows * width; e += kThreadsPerBlock) {
    const int64_t at = static_cast<int64_t>(e / width) * a.rows + block_first + e % width;
    float sum = 0;
#pragma unroll 8
    for (int s = 0; s < a.splits; ++s) sum += __ldcg(a.partial + s * split_stride + at);
    a.out[at] = __float2half_rn(sum);
  }
}

template <int kNT, int kTiles>
__global__ void __launch_bounds__(GemmThreads<kTiles>(), GemmBlocksPerSm<kNT, kTiles>())
    Q4Gemm(GemmArgs a) {
  constexpr int kGemmThreads = GemmThreads<kTiles>(), kWarpRows = kTiles * kRows;
  extern __shared__ uint4 dynamic_smem[];
  char* smem = reinterpret_cast<char*>(dynamic_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int groups = a.k / 32, steps = (groups + 3) / 4;
  const int t0 = static_cast<int>(int64_t{blockIdx.y} * steps / a.splits);
  const int t1 = static_cast<int>(int64_t{blockIdx.y + 1} * steps / a.splits);
  const int block_first = blockIdx.x * kGemmRows;
  const int count = t1 - t0;
  // What this thread copies each sub-step, its addresses at sub-step 0: 16 bytes of each of 4
  // weight rows (4 threads a row, a group each), the 4 scales of one row, and kXPieces pieces of
  // 16 bytes of x (rows m past M: zeros).
  constexpr int kWPieces = kGemmRows * 4 / kGemmThreads, kXPieces = 8 * kNT * 16 / kGemmThreads;
  static_assert(kXPieces >= 1 && kGemmThreads >= kGemmRows, "a thread copies x and a row's scales");
  const int c4 = threadIdx.x % 4;
  const uint4* wsrc[kWPieces];
#pragma unroll
  for (int i = 0; i < kWPieces; ++i) {
    const int64_t row = min(block_first + static_cast<int>(threadIdx.x) / 4 + i * kGemmThreads / 4,
                            a.rows - 1);
    wsrc[i] = a.w + row * groups + c4;
  }
  const half* ssrc = a.scale + min(block_first + static_cast<int>(threadIdx.x), a.rows - 1) *
                                   static_cast<int64_t>(groups);
  const half* xsrc[kXPieces];
  int xk[kXPieces];  // the piece's first k at sub-step 0; past K (or m past M): -1
#pragma unroll
  for (int j = 0; j < kXPieces; ++j) {
    const int i = threadIdx.x + j * kGemmThreads, m = i / 16;
    xk[j] = m < a.m_rows ? 8 * (i % 16) : -1;
    xsrc[j] = a.x + static_cast<int64_t>(min(m, a.m_rows - 1)) * a.k + 8 * (i % 16);
  }
  auto copy = [&](int u) {  // sub-step t0 + u -> stage u % kGemmStages, one commit group
    if (u < count) {
      const int t = t0 + u;
      char* stage = smem + (u % kGemmStages) * GemmStageBytes<kNT>();
      const int w_at = min(4 * t, groups - 1 - c4);  // groups past K: the last one
#pragma unroll
      for (int i = 0; i < kWPieces; ++i) {
        CopyAsync16Row(stage + 16 * (threadIdx.x + i * kGemmThreads), wsrc[i] + w_at);
      }
      half* scales = reinterpret_cast<half*>(stage + kGemmWBytes) + 4 * threadIdx.x;
      if (threadIdx.x < kGemmRows && a.scales8) {
        CopyAsync8(scales, ssrc + 4 * t);
      } else if (threadIdx.x < kGemmRows) {
        for (int v = 0; v < 4; ++v) {
          scales[v] = 4 * t + v < groups ? ssrc[4 * t + v] : __float2half(0);
        }
      }
      half* xs = reinterpret_cast<half*>(stage + kGemmWBytes + kGemmSBytes);
#pragma unroll
      for (int j = 0; j < kXPieces; ++j) {
        // piece p = (i % 16) = 4 c + w of row m = i / 16 -> unit 4 w + c of the row
        const int i = threadIdx.x + j * kGemmThreads, p = i % 16;
        const bool valid = xk[j] >= 0 && 128 * t + xk[j] < a.k;
        CopyAsync16(xs + (i / 16) * kGemmXStride + 8 * (4 * (p % 4) + p / 4),
                    valid ? xsrc[j] + 128 * t : a.x, valid);
      }
    }
    CommitAsync();
  };
  float acc[kTiles][kNT][4] = {};
#pragma unroll
  for (int u = 0; u < kGemmStages - 1; ++u) copy(u);
  for (int u = 0; u < count; ++u) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kGemmStages - 2));
    {  // this thread's pieces of x, in: pair them up as the MMAs take them (PairUp), in place
      half* xs = reinterpret_cast<half*>(smem + (u % kGemmStages) * GemmStageBytes<kNT>() +
                                         kGemmWBytes + kGemmSBytes);
#pragma unroll
      for (int j = 0; j < kXPieces; ++j) {
        const int i = threadIdx.x + j * kGemmThreads, p = i % 16;
        uint4* piece =
            reinterpret_cast<uint4*>(xs + (i / 16) * kGemmXStride + 8 * (4 * (p % 4) + p / 4));
        uint32_t b[4];
        PairUp(*piece, b);
        *piece = make_uint4(b[0], b[1], b[2], b[3]);
      }
    }
    __syncthreads();  // sub-step u is in; every warp is done with the stage of u - 1
    copy(u + kGemmStages - 1);
    const char* stage = smem + (u % kGemmStages) * GemmStageBytes<kNT>();
    const uint4* ws = reinterpret_cast<const uint4*>(stage) + warp * kWarpRows * 4 + c;
    const unsigned short* ss = reinterpret_cast<const unsigned short*>(stage + kGemmWBytes) +
                               warp * kWarpRows * 4 + c;
    const half* xg = reinterpret_cast<const half*>(stage + kGemmWBytes + kGemmSBytes) +
                     g * kGemmXStride + 8 * c;
    uint4 q[kTiles][2];
    uint32_t s2[kTiles][2];
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = kRows * i + 8 * h + g;  // the warp's row
        q[i][h] = LoadShared(ws + 4 * r);
        const uint32_t raw = ss[4 * r];
        s2[i][h] = raw | (raw << 16);
      }
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      uint32_t wl[kTiles][4], wh[kTiles][4];  // rows g and g + 8
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        Dequantize(reinterpret_cast<const uint32_t*>(&q[i][0])[word], s2[i][0], wl[i]);
        Dequantize(reinterpret_cast<const uint32_t*>(&q[i][1])[word], s2[i][1], wh[i]);
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const uint4 b = LoadShared(xg + 8 * j * kGemmXStride + 32 * word);  // paired up
#pragma unroll
        for (int i = 0; i < kTiles; ++i) {
          Mma(acc[i][j], wl[i][0], wh[i][0], wl[i][1], wh[i][1], b.x, b.y);
          Mma(acc[i][j], wl[i][2], wh[i][2], wl[i][3], wh[i][3], b.z, b.w);
        }
      }
    }
  }
  WaitAsync();  // (only empty groups are left)
  // acc[i][j]: rows first + 16 i + g (+ 8 for [2], [3]), rows of x 8 j + 2 c (+ 1 for [1], [3])
  const int first = block_first + warp * kWarpRows;
  GemmFinish<kGemmThreads>(a, block_first, [&](auto&& put) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          put(first + kRows * i + g + 8 * (e / 2), 8 * j + 2 * c + e % 2, acc[i][j][e]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The same product on Hopper's warpgroup MMAs (wgmma, sm_90a; Q4Gemm above elsewhere), for
// K % 128 == 0 and up to kN (16, 32, 64 or 128) rows of x: x becomes the MMA's B (16 k x kN, read
// by the tensor cores from shared memory through a descriptor) and the dequantized weights its A
// (64 rows x 16 k, in registers). A block is four warpgroups of 64 rows (two at kN = 128, whose
// accumulators take 64 registers a thread: WgmmaGroups), WgmmaRows<kN>() in all. wgmma
// runs asynchronously: a warp dequantizes the next word of its rows while the tensor cores work
// on the last, so the ALU work that bounds Q4Gemm overlaps the MMAs. K is split over the blocks
// of a cluster (1 to 8, WgmmaSplits): each puts its sums in its shared memory and adds a slice
// of all of them through distributed shared memory, so a split costs no scratch traffic and no
// counters (Q4Gemm's splits write and read fp32 partial sums in global memory).
//
// The k order inside an MMA is free as long as A and B agree. A lane (g, c) of warp w holds
// rows 16 w + g and + 8 of its warpgroup's tile and loads their group 4 t + c of sub-step t
// (one uint4, as the GEMV does): word v of it (8 values, k = 32 c + 8 v ..) dequantizes into
// the pairs p = (k + p, k + p + 4), p = 0..3, which are A's slots (2 c, 2 c + 1) of virtual
// step 2 v + h (p = 2 h) and (2 c + 8, 2 c + 9) (p = 2 h + 1). So B's slot 8 j + 2 c + e of
// virtual step 2 v + h must hold x[32 c + 8 v + 2 h + j + 4 e]. A slot of B (a sub-step, 128 k)
// holds core matrices (8 rows of x x 16 bytes) at ((2 s + j) kN + n) 16 bytes for virtual step
// s: along K (j) kN x 16 bytes apart (the descriptor's leading byte offset), along N 128 (its
// stride byte offset).
//
// A sub-step's x (natural order: each row's 256 bytes read by 16 lanes, one request for two
// rows) and the block's scales (8 bytes a row) come into a staging ring with cp.async
// kWgmmaStaging sub-steps ahead; the weights go straight to registers, kWgmmaDepth sub-steps
// ahead. Each iteration: one barrier, the MMAs of sub-step u, then sub-step u + 1's x paired up
// (PairUp, then a 4 x 4 transpose of words: the thread of (row of x n, word v) writes the four
// rows (v, p)) from staging into B's slot while the tensor cores work.
//
// H200, Llama-2-7B's matrices at 64 rows of x (bench/q4_batched.py): 128 us for a layer's
// four with Q4Gemm's splits through global memory, 124 through a cluster, 112.7 with the loop's
// instructions cut (213 a sub-step a thread), against Q4Gemm's 189; at 128 rows 195 us in one
// kN = 128 kernel against 224 in two of 64. The kernel is bound by what it issues: fewer
// instructions made it faster, a loop twice its size (fewer instructions) slower. Two tiles a
// warpgroup (8 warps, 224-249 registers), a register ring of 2 to 4 sub-steps, 4 fragment
// buffers, x staged per warpgroup, and a stream-K grid were all within 5% or slower; any non-MMA
// code between a word's wgmma.fence and its commit makes ptxas serialize the MMAs (C7513)
// (bench/NOTES.md).

// A Q4Wgmma<kN> block: four warpgroups of one 64-row tile (256 weight rows, 512 threads) up to
// kN = 64; two (128 rows, 256 threads) at kN = 128, whose 64 fp32 accumulators a thread need
// the registers of a 256-thread block.
template <int kN>
__host__ __device__ constexpr int WgmmaGroups() {
  return kN <= 64 ? 4 : 2;
}
template <int kN>
__host__ __device__ constexpr int WgmmaThreads() {
  return 128 * WgmmaGroups<kN>();
}
template <int kN>
__host__ __device__ constexpr int WgmmaRows() {
  return 64 * WgmmaGroups<kN>();
}
constexpr int kWgmmaMaxN = 128;   // rows of x a Q4Wgmma kernel takes
constexpr int kWgmmaStaging = 3;  // x and scales as copied: sub-steps u + 1 .. u + 3 in flight
constexpr int kWgmmaSlots = 3;    // x as B: u - 1 (another warpgroup's MMAs), u, u + 1
constexpr int kWgmmaDepth = 3;    // sub-steps of weights in registers
constexpr int kStagingRow = 256 + 16;  // bytes between x's rows in staging (8 rows: 8 banks)
constexpr int kWgmmaMaxSplits = 8;     // a cluster (the portable size)

template <int kN>
__host__ __device__ constexpr int WgmmaSlotBytes() {
  return kN * 256;
}

template <int kN>
__host__ __device__ constexpr int WgmmaStagingBytes() {
  return kN * kStagingRow + WgmmaRows<kN>() * 8;
}

template <int kN>
__host__ __device__ constexpr int WgmmaSmemBytes() {
  return kWgmmaSlots * WgmmaSlotBytes<kN>() + kWgmmaStaging * WgmmaStagingBytes<kN>();
}

// d (64 x kN fp32, the warpgroup's accumulators) += a (64 x 16 fp16, registers: a warp's rows in
// mma.sync's A layout) b (16 x kN fp16, shared memory, `b` its descriptor), asynchronously.
template <int kN>
__device__ __forceinline__ void Wgmma(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t b);

template <>
__device__ __forceinline__ void Wgmma<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, "
      "%8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
}

template <>
__device__ __forceinline__ void Wgmma<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, "
      "%8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
}

template <>
__device__ __forceinline__ void Wgmma<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, "
      "%8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
}

template <>
__device__ __forceinline__ void Wgmma<16>(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7"
      "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// A shared-memory matrix descriptor without swizzling: start, leading (K) and stride (M/N) byte
// offsets between core matrices, each in 16-byte units.
__device__ __forceinline__ uint64_t WgmmaDescriptor(const void* start, uint32_t leading,
                                                    uint32_t stride) {
  const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(start));
  return uint64_t{(at >> 4) & 0x3FFF} | uint64_t{(leading >> 4) & 0x3FFF} << 16 |
         uint64_t{(stride >> 4) & 0x3FFF} << 32;
}

// 16 bytes read once, with L2 asked to fetch the 256 around them (the row's next sub-steps).
__device__ __forceinline__ uint4 LoadStreaming256(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int kN>
__global__ void __launch_bounds__(WgmmaThreads<kN>(), 1) Q4Wgmma(GemmArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kAcc = kN / 2, kUnits = 4 * kN, kPieces = kN * 16;  // x's 16-byte pieces
  constexpr int kThreads = WgmmaThreads<kN>(), kBlockRows = WgmmaRows<kN>();
  constexpr int kSumsRow = kBlockRows + 4;  // floats between x's rows of a split's sums
  static_assert(WgmmaSmemBytes<kN>() >= kN * kSumsRow * 4, "a split's sums fit the rings");
  extern __shared__ uint4 dynamic_smem[];
  char* slots = reinterpret_cast<char*>(dynamic_smem);
  char* staging = slots + kWgmmaSlots * WgmmaSlotBytes<kN>();
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int groups = a.k / 32, steps = groups / 4;
  const int t0 = static_cast<int>(int64_t{blockIdx.y} * steps / a.splits);
  const int t1 = static_cast<int>(int64_t{blockIdx.y + 1} * steps / a.splits);
  const int count = t1 - t0, block_first = blockIdx.x * kBlockRows;
  const int mine = 64 * warpgroup + 16 * warp + g;  // this lane's row in the block (+ 8 h)
  const uint4* wsrc[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    wsrc[h] = a.w + int64_t{min(block_first + mine + 8 * h, a.rows - 1)} * groups + 4 * t0 + c;
  }
  // What this thread copies each sub-step: x's pieces (row i / 16, k 8 (i % 16) ..) for
  // i = threadIdx.x + kThreads j, and (the first kBlockRows threads) a row's 4 scales
  constexpr int kCopies = (kPieces + kThreads - 1) / kThreads;
  const half* xsrc[kCopies];
  bool x_valid[kCopies];
#pragma unroll
  for (int j = 0; j < kCopies; ++j) {
    const int n = (threadIdx.x + kThreads * j) / 16;
    x_valid[j] = n < a.m_rows;
    xsrc[j] = a.x + int64_t{min(n, a.m_rows - 1)} * a.k + 128 * t0 + 8 * (threadIdx.x % 16);
  }
  const half* ssrc = a.scale + 4 * t0 +
                     int64_t{min(block_first + static_cast<int>(threadIdx.x), a.rows - 1)} * groups;
  // The rings' slots are static in the loop below (unrolled by kWgmmaDepth == kWgmmaSlots ==
  // kWgmmaStaging): sub-step u's are u % 3 = its d there, with no division and the addresses fixed
  static_assert(kWgmmaDepth == kWgmmaSlots && kWgmmaDepth == kWgmmaStaging, "one slot a d");
  auto copy = [&](int u, int slot) {  // sub-step t0 + u -> staging `slot`, one commit group
    if (u < count) {
      char* st = staging + slot * WgmmaStagingBytes<kN>();
#pragma unroll
      for (int j = 0; j < kCopies; ++j) {
        const int i = threadIdx.x + kThreads * j;
        if (kPieces % kThreads != 0 && i >= kPieces) break;
        // (a row past M: no read, 16 zero bytes; its address is row M - 1's)
        CopyAsync16(st + (i / 16) * kStagingRow + 16 * (i % 16), xsrc[j] + 128 * u, x_valid[j]);
      }
      if (threadIdx.x < kBlockRows) {
        CopyAsync8(st + kN * kStagingRow + 8 * threadIdx.x, ssrc + 4 * u);
      }
    }
    CommitAsync();
  };
  // A sub-step's x, staged in `slot`, paired up into B's slot `slot` by the last kUnits threads
  // (the first kBlockRows copy the scales), a unit (row of x xn, word xv) each (at kN = 128, two
  // each: every thread); this lane's scales (rows mine and + 8, group c) as (s, s)
  constexpr int kPairings = (kUnits + kThreads - 1) / kThreads;
  static_assert(kUnits <= kThreads || kUnits % kThreads == 0, "whole units a thread");
  const int pairing = static_cast<int>(threadIdx.x) - (kUnits < kThreads ? kThreads - kUnits : 0);
  auto pair_up = [&](int slot_index, uint32_t (&scales)[2]) {
    const char* st = staging + slot_index * WgmmaStagingBytes<kN>();
    if (pairing >= 0) {
      char* slot = slots + slot_index * WgmmaSlotBytes<kN>();
#pragma unroll
      for (int r = 0; r < kPairings; ++r) {
        const int unit = pairing + kThreads * r, xn = unit % kN, xv = unit / kN;
        uint32_t b[4][4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          PairUp(LoadShared(st + xn * kStagingRow + 16 * (4 * q + xv)), b[q]);
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          *reinterpret_cast<uint4*>(slot + ((4 * xv + p) * kN + xn) * 16) =
              make_uint4(b[0][p], b[1][p], b[2][p], b[3][p]);
        }
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for the tensor cores
    }
    const unsigned short* ss =
        reinterpret_cast<const unsigned short*>(st + kN * kStagingRow) + 4 * mine + c;
    scales[0] = ss[0] * 0x10001u;
    scales[1] = ss[32] * 0x10001u;  // row mine + 8
  };
  uint4 q[kWgmmaDepth][2];
  auto load_w = [&](int u, uint4 (&qs)[2]) {
    if (u < count) {
      qs[0] = LoadStreaming256(wsrc[0] + 4 * u);
      qs[1] = LoadStreaming256(wsrc[1] + 4 * u);
    }
  };
#pragma unroll
  for (int d = 0; d < kWgmmaDepth; ++d) load_w(d, q[d]);
#pragma unroll
  for (int u = 0; u < kWgmmaStaging; ++u) copy(u, u);
  uint32_t scales[2], next[2];
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kWgmmaStaging - 1));
  __syncthreads();
  pair_up(0, scales);
  float acc[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) acc[e] = 0.0f;
  uint32_t frag[2][2][4];  // [word % 2][half step h][A's 4 registers]
  for (int base = 0; base < count; base += kWgmmaDepth) {
#pragma unroll
    for (int d = 0; d < kWgmmaDepth; ++d) {
      const int u = base + d;
      if (u >= count) break;
      asm volatile("cp.async.wait_group %0;\n" ::"n"(kWgmmaStaging - 2));  // u + 1's copies
      __syncthreads();  // u's B paired up, u + 1 staged, u - 2's MMAs done in every warpgroup
      copy(u + kWgmmaStaging, d);
      const uint64_t desc = WgmmaDescriptor(slots + d * WgmmaSlotBytes<kN>(), kN * 16, 128);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        WgmmaWait<1>();  // the MMAs of word v - 2 (the same fragment registers) are done
        uint32_t lo[4], hi[4];
        Dequantize(reinterpret_cast<const uint32_t*>(&q[d][0])[v], scales[0], lo);
        Dequantize(reinterpret_cast<const uint32_t*>(&q[d][1])[v], scales[1], hi);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          frag[v % 2][h][0] = lo[2 * h];
          frag[v % 2][h][1] = hi[2 * h];
          frag[v % 2][h][2] = lo[2 * h + 1];
          frag[v % 2][h][3] = hi[2 * h + 1];
        }
        WgmmaFence();
        // virtual steps 2 v and 2 v + 1: their core matrices start 2 (2 v + h) kN x 16 bytes in
        Wgmma<kN>(acc, frag[v % 2][0], desc + ((4 * v * kN * 16) >> 4));
        Wgmma<kN>(acc, frag[v % 2][1], desc + (((4 * v + 2) * kN * 16) >> 4));
        WgmmaCommit();
      }
      load_w(u + kWgmmaDepth, q[d]);
      if (u + 1 < count) pair_up((d + 1) % kWgmmaSlots, next);
      scales[0] = next[0], scales[1] = next[1];
    }
  }
  WgmmaWait<0>();
#pragma unroll
  for (int e = 0; e < kAcc; ++e) asm volatile("" : "+f"(acc[e])::"memory");
  WaitAsync();  // (only empty groups are left)
  // acc[4 j + e]: weight row mine (+ 8 for e = 2, 3), row of x 8 j + 2 c (+ 1 for e = 1, 3)
  if (a.splits == 1) {
    GemmFinish<kThreads>(a, block_first, [&](auto&& put) {
#pragma unroll
      for (int e = 0; e < kAcc; ++e) {
        put(block_first + mine + 8 * (e % 4 / 2), 8 * (e / 4) + 2 * c + e % 2, acc[e]);
      }
    });
    return;
  }
  // K split over the blocks of a cluster (one column of blocks): each block's sums into its own
  // shared memory (the rings' bytes, free now), then each block adds a slice of all of them
  // (distributed shared memory) and writes it out
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();  // every warp is done with the rings
  float* sums = reinterpret_cast<float*>(dynamic_smem);
#pragma unroll
  for (int e = 0; e < kAcc; ++e) {
    sums[(8 * (e / 4) + 2 * c + e % 2) * kSumsRow + mine + 8 * (e % 4 / 2)] = acc[e];
  }
  cluster.sync();
  const int ranks = static_cast<int>(cluster.num_blocks()), rank = cluster.block_rank();
  const int width = min(kBlockRows, a.rows - block_first), quads = a.m_rows * kBlockRows / 4;
  const int end = (rank + 1) * quads / ranks;  // this block's share of the sums, 4 at a time
  for (int j = rank * quads / ranks + threadIdx.x; j < end; j += kThreads) {
    const int m = 4 * j / kBlockRows, r = 4 * j % kBlockRows, at = m * kSumsRow + r;
    if (r >= width) continue;
    float4 sum = *reinterpret_cast<const float4*>(cluster.map_shared_rank(sums + at, 0));
    for (int other = 1; other < ranks; ++other) {
      const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(sums + at, other));
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    half* out = a.out + static_cast<int64_t>(m) * a.rows + block_first + r;
    if (a.vector_out && r + 4 <= width) {
      const __half2 lo = __floats2half2_rn(sum.x, sum.y), hi = __floats2half2_rn(sum.z, sum.w);
      *reinterpret_cast<uint2*>(out) = make_uint2(*reinterpret_cast<const uint32_t*>(&lo),
                                                  *reinterpret_cast<const uint32_t*>(&hi));
    } else {
      const float v[4] = {sum.x, sum.y, sum.z, sum.w};
      for (int e = 0; e < 4 && r + e < width; ++e) out[e] = __float2half_rn(v[e]);
    }
  }
  cluster.sync();  // no block leaves while another reads its shared memory
#endif
}

// ---------------------------------------------------------------------------------------------
// f16 SwiGLU: the gate and up rows of 16 outputs per block; step s: lane c reads the values
// 32 s + 8 c .. + 7 of its rows (the quad: 64 contiguous bytes) and of x, in natural order.

__global__ void __launch_bounds__(kThreads, 2) F16SwiGLU(Args a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int first = blockIdx.x * kRows;
  const half* wrow[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wrow[i][h] = static_cast<const half*>(a.w) +
                   WeightRow<2, true>(first, i, g + 8 * h, a.rows) * a.k;
    }
  }
  const half* xrow = a.x + static_cast<int64_t>(min(g, a.m_rows - 1)) * a.k;
  float acc[2][4] = {};
  const int steps = a.k / 32, super_steps = (steps + kF16Steps - 1) / kF16Steps;
  for (int t = warp; t < super_steps; t += kWarps) {
    // A step past K (in the last super-step) reads the last one again, against x = 0.
    uint4 q[kF16Steps][2][2], xv[kF16Steps];
#pragma unroll
    for (int u = 0; u < kF16Steps; ++u) {
      const int step = t * kF16Steps + u, k0 = 32 * min(step, steps - 1) + 8 * c;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) q[u][i][h] = LoadStreaming(wrow[i][h] + k0);
      }
      xv[u] = LoadCached(xrow + k0);
      if (step >= steps) xv[u] = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kF16Steps; ++u) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint4 &lo = q[u][i][0], &hi = q[u][i][1];
        Mma(acc[i], lo.x, hi.x, lo.y, hi.y, xv[u].x, xv[u].y);
        Mma(acc[i], lo.z, hi.z, lo.w, hi.w, xv[u].z, xv[u].w);
      }
    }
  }
  Finish<2, true>(acc, a.out, first, a.rows, a.m_rows);
}

// f16 SwiGLU of one row of x (the batch-1 decode): a warp per weight row, as the float GEMVs
// that TVM compiles for Kiln (targets/gemv.py: 16-byte loads, a warp's lanes along K, one
// shuffle reduction), here with SiLU*up as the epilogue. Warps 2 o and 2 o + 1 take output
// first + o's gate and up rows; lane l reads the 16-byte pieces l, l + 32, ... of its row and of
// x, kF16RowLoads of them at once (fp32 products and sums).
constexpr int kF16RowOutputs = kWarps / 2;  // outputs a block
constexpr int kF16RowLoads = 8;             // 16-byte pieces of the row a lane has in flight

__global__ void __launch_bounds__(kThreads, 3) F16SwiGLURow(Args a) {
  __shared__ float sums[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int output = blockIdx.x * kF16RowOutputs + warp / 2;
  const int64_t row = min(output, a.rows - 1) + (warp % 2) * int64_t{a.rows};  // past the end:
  const half* w = static_cast<const half*>(a.w) + row * a.k;  // the last row, result dropped
  const int pieces = a.k / 8;
  float acc[4] = {};
  for (int base = lane; base < pieces; base += 32 * kF16RowLoads) {
    uint4 wv[kF16RowLoads], xv[kF16RowLoads];
#pragma unroll
    for (int u = 0; u < kF16RowLoads; ++u) {
      const int piece = min(base + 32 * u, pieces - 1);  // past K: read again, counted as 0
      wv[u] = LoadStreaming(w + 8 * piece);
      xv[u] = LoadCached(a.x + 8 * piece);
    }
#pragma unroll
    for (int u = 0; u < kF16RowLoads; ++u) {
      if (base + 32 * u >= pieces) continue;
      const uint32_t ws[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      const uint32_t xs[4] = {xv[u].x, xv[u].y, xv[u].z, xv[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 wf = __half22float2(*reinterpret_cast<const __half2*>(&ws[j]));
        const float2 xf = __half22float2(*reinterpret_cast<const __half2*>(&xs[j]));
        acc[j] = fmaf(wf.x, xf.x, fmaf(wf.y, xf.y, acc[j]));
      }
    }
  }
  const float sum = WarpSum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  if (lane == 0) sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x < kF16RowOutputs) {
    const int o = blockIdx.x * kF16RowOutputs + threadIdx.x;
    if (o < a.rows) {
      a.out[o] = __float2half_rn(Silu(sums[2 * threadIdx.x]) * sums[2 * threadIdx.x + 1]);
    }
  }
}

// add_rms_norm: a block a row, kNormThreads threads, each holding up to kNormPieces 16-byte
// pieces of it in registers from the one read to the writes: s = x + r (in fp16, as TVM's
// `add`), y = fp16(rsqrt(mean(s^2) + eps) s w) (fp32 from s on, as TVM's `rms_norm`, and
// kiln.passes.fuse_add_rms_norm's kernel, which this replaces).
constexpr int kNormThreads = 512;
constexpr int kNormPieces = 4;  // so a row of at most 8 x 512 x 4 = 16384 values

__global__ void __launch_bounds__(kNormThreads) AddRMSNorm(const half* x, const half* r,
                                                           const half* w, half* s, half* y,
                                                           int hidden, float epsilon) {
  __shared__ float warp_sums[kNormThreads / 32];
  const int64_t base = int64_t{blockIdx.x} * hidden;
  const int pieces = hidden / 8;
  uint4 sum_v[kNormPieces], w_v[kNormPieces];
  float squares = 0.f;
#pragma unroll
  for (int u = 0; u < kNormPieces; ++u) {
    const int piece = threadIdx.x + u * kNormThreads;
    if (piece >= pieces) continue;
    const uint4 xv = LoadCached(x + base + 8 * piece), rv = LoadCached(r + base + 8 * piece);
    w_v[u] = LoadCached(w + 8 * piece);  // with x and r: one round trip before the reduction
    sum_v[u] = make_uint4(AddHalf2(xv.x, rv.x), AddHalf2(xv.y, rv.y), AddHalf2(xv.z, rv.z),
                          AddHalf2(xv.w, rv.w));
    const uint32_t h[4] = {sum_v[u].x, sum_v[u].y, sum_v[u].z, sum_v[u].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[j]));
      squares = fmaf(f.x, f.x, fmaf(f.y, f.y, squares));
    }
  }
  squares = WarpSum(squares);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = squares;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kNormThreads / 32; ++i) total += warp_sums[i];
  const float inv = rsqrtf(total / static_cast<float>(hidden) + epsilon);
#pragma unroll
  for (int u = 0; u < kNormPieces; ++u) {
    const int piece = threadIdx.x + u * kNormThreads;
    if (piece >= pieces) continue;
    const uint32_t h[4] = {sum_v[u].x, sum_v[u].y, sum_v[u].z, sum_v[u].w};
    const uint32_t g[4] = {w_v[u].x, w_v[u].y, w_v[u].z, w_v[u].w};
    uint32_t out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[j]));
      const float2 gw = __half22float2(*reinterpret_cast<const __half2*>(&g[j]));
      const __half2 o = __floats2half2_rn(inv * f.x * gw.x, inv * f.y * gw.y);
      out[j] = *reinterpret_cast<const uint32_t*>(&o);
    }
    *reinterpret_cast<uint4*>(s + base + 8 * piece) = sum_v[u];
    *reinterpret_cast<uint4*>(y + base + 8 * piece) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks and launches. Dtypes and shapes are checked first, then devices
// and layout (so that a caller learns what is wrong with its arguments wherever they are).

void CheckDtype(const char* name, const Tensor& t, const char* what, DLDataTypeCode code,
                int bits, const char* expected) {
  DLDataType d = t.dtype();
  TVM_FFI_CHECK(d.code == code && d.bits == bits && d.lanes == 1, TypeError)
      << name << ": " << what << " must be " << expected << ", it has dtype code="
      << static_cast<int>(d.code) << " bits=" << static_cast<int>(d.bits)
      << " lanes=" << static_cast<int>(d.lanes);
}

bool Aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(DataOf(t)) % 16 == 0; }

// On x's GPU, contiguous and (`aligned`) 16-byte aligned.
void CheckPlacement(const char* name, const Tensor& t, const char* what, int device,
                    bool aligned) {
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA && t.device().device_id == device, ValueError)
      << name << ": " << what << " must be on cuda:" << device << ", it is on device "
      << t.device().device_type << ":" << t.device().device_id;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << name << ": " << what << " must be contiguous";
  TVM_FFI_CHECK(!aligned || Aligned16(t), ValueError)
      << name << ": " << what << " must be 16-byte aligned";
}

// x and out: float16, M = the product of x's leading dimensions, K a multiple of 32;
// out shaped as x with its last dimension `rows` (the weight's output rows).
Args CheckActivations(const char* name, const Tensor& x, const Tensor& out, int64_t rows) {
  CheckDtype(name, x, "x", kDLFloat, 16, "float16");
  CheckDtype(name, out, "out", kDLFloat, 16, "float16");
  TVM_FFI_CHECK(x.ndim() >= 1, ValueError) << name << ": x must have at least one dimension";
  const int64_t k = x.size(x.ndim() - 1);
  int64_t m = 1;
  for (int d = 0; d + 1 < x.ndim(); ++d) m *= x.size(d);
  TVM_FFI_CHECK(m >= 1 && m < (int64_t{1} << 24), ValueError)
      << name << " takes 1 to 2^24 rows of x (the product of its leading dimensions), not " << m;
  TVM_FFI_CHECK(rows >= 1 && rows < (int64_t{1} << 30), ValueError)
      << name << ": the weight gives " << rows << " output rows";
  bool same = out.ndim() == x.ndim() && out.size(out.ndim() - 1) == rows;
  for (int d = 0; same && d + 1 < x.ndim(); ++d) same = out.size(d) == x.size(d);
  TVM_FFI_CHECK(same, ValueError) << name << ": out must be shaped as x with its last dimension "
                                  << rows << " (x's leading dimensions, then the output rows)";
  Args a{};
  a.m_rows = static_cast<int>(m);
  a.k = static_cast<int>(k);
  a.rows = static_cast<int>(rows);
  return a;
}

int64_t CheckK(const char* name, const Tensor& x) {
  const int64_t k = x.ndim() >= 1 ? x.size(x.ndim() - 1) : 0;
  TVM_FFI_CHECK(k > 0 && k % 32 == 0 && k < (int64_t{1} << 30), ValueError)
      << name << ": K (x's last dimension, " << k << ") must be a positive multiple of 32";
  return k;
}

// Places x and out, returns the device.
int PlaceActivations(const char* name, const Tensor& x, const Tensor& out, Args* a) {
  const int device = x.device().device_id;
  CheckPlacement(name, x, "x", device, true);
  CheckPlacement(name, out, "out", device, false);
  a->x = reinterpret_cast<const half*>(DataOf(x));
  a->out = reinterpret_cast<half*>(DataOf(out));
  return device;
}

int64_t SwiGLURows(const char* name, int64_t n) {
  TVM_FFI_CHECK(n % 2 == 0, ValueError)
      << name << ": the weight must have 2 I rows (gate, then up), not " << n;
  return n / 2;
}

// A kernel takes at most kMaxM rows of x (the MMA's 8 columns): `launch` runs once for each
// kMaxM of them, every launch reading the whole weight again (what L2 keeps of it aside).
template <typename Launch>
void ForEachChunk(const Args& a, Launch launch) {
  for (int first = 0; first < a.m_rows; first += kMaxM) {
    Args chunk = a;
    chunk.x = a.x + static_cast<int64_t>(first) * a.k;
    chunk.out = a.out + static_cast<int64_t>(first) * a.rows;
    chunk.m_rows = a.m_rows - first < kMaxM ? a.m_rows - first : kMaxM;
    launch(chunk);
  }
}

template <int kTiles, bool kSwiGLU, bool kVectorScales, bool kPrefetch>
void LaunchQ4(const char* name, const Args& a, int device, cudaStream_t stream) {
  auto kernel = Q4Gemv<kTiles, kSwiGLU, kVectorScales, kPrefetch>;
  const size_t smem = size_t{kXBytesPerRow} * a.m_rows;
  static std::atomic<uint64_t> opted_in{0};  // with the static 4-8 KiB, past 48 KiB: all rows
  if (smem > 32 * 1024) OptInSharedMemory(kernel, kXBytesPerRow * kMaxM, device, opted_in, name);
  constexpr int per_block = OutputsPerBlock<kTiles, kSwiGLU>();
  const unsigned blocks = static_cast<unsigned>((a.rows + per_block - 1) / per_block);
  kernel<<<blocks, kThreads, smem, stream>>>(a);
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

template <int kTiles, bool kSwiGLU, bool kPrefetch>
void LaunchQ4(const char* name, const Args& a, bool vector_scales, int device,
              cudaStream_t stream) {
  vector_scales ? LaunchQ4<kTiles, kSwiGLU, true, kPrefetch>(name, a, device, stream)
                : LaunchQ4<kTiles, kSwiGLU, false, kPrefetch>(name, a, device, stream);
}

// The q4 kernels' variants, numbered as the bench-only hooks (kiln.gemv.q4_tiled,
// q4_swiglu_tiled, q4_graph_time) take them: 16 tiles weight rows a block, tiles = 1 or 2, and
// +2 where the warps prefetch (Q4Gemv's kPrefetch).
//   1: 16 rows a block: q4, 16 outputs; SwiGLU, 8 (gate and up rows in one tile)
//   2: 32 rows a block: q4, 32 outputs; SwiGLU, 16 (a gate tile and an up tile)
//   3, 4: 1 and 2, prefetching
// Variant 0 is the default, DefaultVariant's.
constexpr int kVariants = 4;

// The variant kiln.gemv.q4 and q4_swiglu run for `rows` outputs (N; I for SwiGLU) of K = `k`:
// the one rule to change from bench/gemv.py's numbers (it prints what this picks per shape).
// Now: 16 weight rows a block, no prefetch, for every shape: on an H100 (bench/RESULTS.md) it
// was the fastest of the four on each Llama-2-7B matrix in a CUDA graph, the SwiGLU form
// included (20.5 us against 22.6 for 32 rows); prefetching cost 2-8 us (down: 14.9 against
// 11.9), the registers it takes leaving fewer blocks an SM.
int DefaultVariant(int64_t rows, int64_t k, bool swiglu) {
  (void)rows, (void)k, (void)swiglu;
  return 1;
}

void LaunchRows(const char* name, int64_t variant, bool swiglu, const Args& a,
                bool vector_scales, int device, cudaStream_t stream) {
  switch (variant + (swiglu ? kVariants : 0)) {
    case 1: return LaunchQ4<1, false, false>(name, a, vector_scales, device, stream);
    case 2: return LaunchQ4<2, false, false>(name, a, vector_scales, device, stream);
    case 3: return LaunchQ4<1, false, true>(name, a, vector_scales, device, stream);
    case 4: return LaunchQ4<2, false, true>(name, a, vector_scales, device, stream);
    case kVariants + 1: return LaunchQ4<1, true, false>(name, a, vector_scales, device, stream);
    case kVariants + 2: return LaunchQ4<2, true, false>(name, a, vector_scales, device, stream);
    case kVariants + 3: return LaunchQ4<1, true, true>(name, a, vector_scales, device, stream);
    case kVariants + 4: return LaunchQ4<2, true, true>(name, a, vector_scales, device, stream);
  }
  TVM_FFI_THROW(ValueError) << name << ": variant " << variant << " is not 1 to " << kVariants;
}

void LaunchVariant(const char* name, int64_t variant, bool swiglu, const Args& a,
                   bool vector_scales, int device, cudaStream_t stream) {
  if (variant == 0) variant = DefaultVariant(a.rows, a.k, swiglu);
  ForEachChunk(a, [&](const Args& chunk) {
    LaunchRows(name, variant, swiglu, chunk, vector_scales, device, stream);
  });
}

constexpr const char* kQ4 = "kiln.gemv.q4";
constexpr const char* kQ4Tiled = "kiln.gemv.q4_tiled";
constexpr const char* kQ4SwiGLU = "kiln.gemv.q4_swiglu";
constexpr const char* kQ4SwiGLUTiled = "kiln.gemv.q4_swiglu_tiled";
constexpr const char* kQ4DefaultVariant = "kiln.gemv.q4_default_variant";
constexpr const char* kQ4GraphTime = "kiln.gemv.q4_graph_time";
constexpr const char* kF16SwiGLU = "kiln.gemv.f16_swiglu";
constexpr const char* kQ4Batched = "kiln.gemv.q4_batched";
constexpr const char* kQ4Dequantize = "kiln.gemv.q4_dequantize";
constexpr const char* kGemm = "kiln.cublas.matmul";  // out = x @ w^T, w (N, K) float16
constexpr const char* kQ4Gemm = "kiln.gemv.q4_gemm";
constexpr const char* kQ4GemmMma = "kiln.gemv.q4_gemm_mma";
constexpr const char* kQ4GemmWgmma = "kiln.gemv.q4_gemm_wgmma";
constexpr const char* kQ4GemmSplits = "kiln.gemv.q4_gemm_splits";
constexpr const char* kQ4GemmPlan = "kiln.gemv.q4_gemm_plan";
constexpr const char* kQ4MoeSwiGLU = "kiln.gemv.q4_moe_swiglu";
constexpr const char* kQ4Moe = "kiln.gemv.q4_moe";
constexpr const char* kMoeRoute = "kiln.gemv.moe_route";
constexpr const char* kAddRMSNorm = "kiln.gemv.add_rms_norm";
// A batched decode's q4 (Q4Batched): up to kMaxM rows of x, the GEMV; up to kMaxGemmRows, Q4Gemm
// (kMaxWgmmaRows on the warpgroup MMAs); more, the weight dequantized once and multiplied on the
// GEMM library, whose cost does not grow with the rows until its tiles fill. H200, the
// Llama-2-7B matrices (bench/q4_batched.py): at 16 rows Q4Gemm takes 13-45 us a matrix against
// the GEMV's 16-83, at 64 rows 24-79 us against dequantize + cuBLAS's 24-167, at 128 rows 47-158
// against 29-170. Q4Wgmma at 64 rows 19-50 us; at 128 rows (then two kernels of 64, each reading
// the weight) a layer's four matrices 253 us against dequantize + cuBLAS's 285, the LM head 101
// against 171; now one kernel of kN = 128 (bench/RESULTS.md).
constexpr int64_t kMaxGemmRows = kGemmMaxM, kMaxWgmmaRows = kWgmmaMaxN;

// A checked q4 call: its arguments, x's device, whether scales load 8 at a time.
struct Q4Call {
  Args a;
  int device;
  bool vector_scales;
};

Q4Call CheckQ4(const char* name, int64_t variant, bool swiglu, const Tensor& x,
               const Tensor& qweight, const Tensor& scale, const Tensor& out) {
  TVM_FFI_CHECK(variant >= 0 && variant <= kVariants, ValueError)
      << name << ": the variant must be 0 (the default) to " << kVariants << ", not " << variant;
  const int64_t k = CheckK(name, x);
  CheckDtype(name, qweight, "qweight", kDLUInt, 32, "uint32");
  CheckDtype(name, scale, "scale", kDLFloat, 16, "float16");
  TVM_FFI_CHECK(qweight.ndim() == 2 && scale.ndim() == 2, ValueError)
      << name << ": qweight must be (N, K / 8) and scale (N, K / 32)";
  const int64_t n = qweight.size(0);
  TVM_FFI_CHECK(qweight.size(1) == k / 8 && scale.size(0) == n && scale.size(1) == k / 32,
                ValueError)
      << name << ": for x's K = " << k << ", qweight must be (N, " << k / 8 << ") and scale (N, "
      << k / 32 << "); they are (" << qweight.size(0) << ", " << qweight.size(1) << ") and ("
      << scale.size(0) << ", " << scale.size(1) << ")";
  Q4Call call{};
  call.a = CheckActivations(name, x, out, swiglu ? SwiGLURows(name, n) : n);
  call.device = PlaceActivations(name, x, out, &call.a);
  CheckPlacement(name, qweight, "qweight", call.device, true);
  CheckPlacement(name, scale, "scale", call.device, false);
  call.a.w = DataOf(qweight);
  call.a.scale = reinterpret_cast<const half*>(DataOf(scale));
  // One 16-byte load of 8 scales needs rows of a multiple of 8 groups, aligned.
  call.vector_scales = (k / 32) % 8 == 0 && Aligned16(scale);
  return call;
}

void RunQ4(const char* name, int64_t variant, bool swiglu, const Tensor& x, const Tensor& qweight,
           const Tensor& scale, const Tensor& out) {
  const Q4Call call = CheckQ4(name, variant, swiglu, x, qweight, scale, out);
  cudaStream_t stream = TvmStream(name, call.device);
  LaunchVariant(name, variant, swiglu, call.a, call.vector_scales, call.device, stream);
}

void Q4(Tensor x, Tensor qweight, Tensor scale, Tensor out) {
  RunQ4(kQ4, 0, false, x, qweight, scale, out);
}

void Q4Tiled(int64_t variant, Tensor x, Tensor qweight, Tensor scale, Tensor out) {
  RunQ4(kQ4Tiled, variant, false, x, qweight, scale, out);
}

void Q4SwiGLU(Tensor x, Tensor qweight, Tensor scale, Tensor out) {
  RunQ4(kQ4SwiGLU, 0, true, x, qweight, scale, out);
}

void Q4SwiGLUTiled(int64_t variant, Tensor x, Tensor qweight, Tensor scale, Tensor out) {
  RunQ4(kQ4SwiGLUTiled, variant, true, x, qweight, scale, out);
}

int64_t Q4DefaultVariant(int64_t rows, int64_t k, bool swiglu) {
  return DefaultVariant(rows, k, swiglu);
}

// For benchmarks: microseconds per kernel of a q4 variant (0: the default) as an artifact runs
// it, in a CUDA graph (no host time between kernels): `reps` launches, the i-th on the weight
// copy i % copies (qweights[i], scales[i]: to read them from HBM, give copies that together
// exceed the L2 cache; one copy: from L2). Runs the graph once, then times a second run with
// events, on a stream of its own.
double Q4GraphTime(int64_t variant, bool swiglu, Tensor x, tvm::ffi::Array<Tensor> qweights,
                   tvm::ffi::Array<Tensor> scales, Tensor out, int64_t reps) {
  const char* name = kQ4GraphTime;
  TVM_FFI_CHECK(qweights.size() >= 1 && qweights.size() == scales.size(), ValueError)
      << name << ": give as many scales as qweights (at least one)";
  TVM_FFI_CHECK(reps >= 1 && reps <= 100000, ValueError) << name << ": reps " << reps;
  std::vector<Q4Call> calls;
  for (size_t i = 0; i < qweights.size(); ++i) {
    calls.push_back(CheckQ4(name, variant, swiglu, x, qweights[i], scales[i], out));
  }
  const int device = calls[0].device;
  TvmStream(name, device);
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  float ms = 0;
  auto launch = [&](int64_t i) {
    const Q4Call& call = calls[i % calls.size()];
    LaunchVariant(name, variant, swiglu, call.a, call.vector_scales, device, stream);
  };
  CheckCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), name, "a stream");
  for (size_t i = 0; i < calls.size(); ++i) launch(i);  // before capturing: attributes set
  CheckCuda(cudaStreamSynchronize(stream), name, "the warm-up");
  CheckCuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), name, "capture");
  for (int64_t i = 0; i < reps; ++i) launch(i);
  CheckCuda(cudaStreamEndCapture(stream, &graph), name, "capture");
  CheckCuda(cudaGraphInstantiate(&exec, graph, 0), name, "cudaGraphInstantiate");
  CheckCuda(cudaEventCreate(&start), name, "an event");
  CheckCuda(cudaEventCreate(&stop), name, "an event");
  CheckCuda(cudaGraphLaunch(exec, stream), name, "the graph");
  CheckCuda(cudaEventRecord(start, stream), name, "an event");
  CheckCuda(cudaGraphLaunch(exec, stream), name, "the graph");
  CheckCuda(cudaEventRecord(stop, stream), name, "an event");
  CheckCuda(cudaEventSynchronize(stop), name, "the graph");
  CheckCuda(cudaEventElapsedTime(&ms, start, stop), name, "the timing");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return 1e3 * ms / reps;
}

// w[n, k] = (nib - 8) * scale[n, k / 32] in fp16, as TVM's q4f16 dequantize computes it (so the
// GEMM multiplies by the same weights as prefill's): a thread turns one packed word into 8
// values and stores them at once.
__global__ void __launch_bounds__(256) DequantizeQ4(const uint32_t* qweight, const half* scale,
                                                    half* w, int64_t words, int k) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= words) return;
  const int64_t row = i / (k / 8), col = i % (k / 8) * 8;
  const uint32_t word = qweight[i];
  const half s = scale[row * (k / 32) + col / 32];
  alignas(16) half values[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    values[j] = __hmul(__int2half_rn(static_cast<int>((word >> (4 * j)) & 15) - 8), s);
  }
  *reinterpret_cast<uint4*>(w + row * k + col) = *reinterpret_cast<const uint4*>(values);
}

void CheckScratch(const char* name, const Tensor& w, int64_t n, int64_t k, int device) {
  CheckDtype(name, w, "w (scratch)", kDLFloat, 16, "float16");
  TVM_FFI_CHECK(w.ndim() == 2 && w.size(0) == n && w.size(1) == k, ValueError)
      << name << ": w (scratch) must be (" << n << ", " << k << ")";
  CheckPlacement(name, w, "w (scratch)", device, true);
}

void LaunchDequantize(const char* name, const Q4Call& call, const Tensor& w,
                      cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(call.a.rows) * call.a.k / 8;
  const unsigned blocks = static_cast<unsigned>((words + 255) / 256);
  DequantizeQ4<<<blocks, 256, 0, stream>>>(static_cast<const uint32_t*>(call.a.w), call.a.scale,
                                           reinterpret_cast<half*>(DataOf(w)), words, call.a.k);
  CheckCuda(cudaGetLastError(), name, "the dequantize launch");
}

// Q4Gemm's split counters, per device: kGemmColumns, zeroed once and reset by the kernels, so
// split calls on one device must not run at once (Kiln runs a device's work on TVM's one stream).
// Allocated on the first call that may (not while the stream is captured into a CUDA graph:
// such a call runs unsplit); nullptr until then.
constexpr int64_t kGemmColumns = 1 << 16;

int* GemmCounters(const char* name, int device, cudaStream_t stream) {
  static std::mutex mu;
  static int* counters[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  int*& mine = counters[device % 64];
  if (mine != nullptr) return mine;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  CheckCuda(cudaStreamIsCapturing(stream, &capturing), name, "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone) return nullptr;
  void* buffer = nullptr;
  CheckCuda(cudaMalloc(&buffer, kGemmColumns * sizeof(int)), name, "cudaMalloc");
  CheckCuda(cudaMemset(buffer, 0, kGemmColumns * sizeof(int)), name, "cudaMemset");
  mine = static_cast<int*>(buffer);
  return mine;
}

// K's splits for Q4Gemm: the fewest that minimize the time in sub-steps of a block's weights,
// (waves of blocks) x (a block's sub-steps + its fixed cost): filling the ring (kGemmStages - 1)
// and, when split, writing its partial sums (M x 256 fp32) and reading them back, as much as M / 8
// sub-steps' weights (16 KB each). A split keeps at least 4 sub-steps, and the partial sums
// (splits x M x N fp32) fit in the scratch's N x K halves.
int GemmSplits(int64_t columns, int64_t k, int m_rows, int64_t resident) {
  const int64_t steps = (k / 32 + 3) / 4;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>({steps / 4, k / (2 * m_rows), 64}));
  int best = 1;
  double best_cost = 0;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t waves = (columns * s + resident - 1) / resident;
    const double per_block = (steps + s - 1) / s + (kGemmStages - 1) + (s > 1 ? m_rows / 8.0 : 0);
    if (s == 1 || waves * per_block < best_cost) {
      best = static_cast<int>(s), best_cost = waves * per_block;
    }
  }
  return best;
}

template <int kNT, int kTiles>
void LaunchGemm(const char* name, GemmArgs a, int device, cudaStream_t stream) {
  auto kernel = Q4Gemm<kNT, kTiles>;
  constexpr int smem = kGemmStages * GemmStageBytes<kNT>();
  static std::atomic<uint64_t> opted_in{0};
  if constexpr (smem > 48 * 1024) OptInSharedMemory(kernel, smem, device, opted_in, name);
  const int64_t columns = (a.rows + kGemmRows - 1) / kGemmRows;
  const int64_t resident = int64_t{SmCount(name, device)} * GemmBlocksPerSm<kNT, kTiles>();
  a.splits = a.counters != nullptr && columns <= kGemmColumns
                 ? GemmSplits(columns, a.k, a.m_rows, resident)
                 : 1;
  kernel<<<dim3(static_cast<unsigned>(columns), a.splits), GemmThreads<kTiles>(), smem, stream>>>(
      a);
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

// Whether Q4Wgmma runs on `device`: the library holds sm_90a code (gemv.py defines
// KILN_GEMV_WGMMA when it builds for sm_90a) and the device is compute capability 9.0.
bool WgmmaRuns(const char* name, int device) {
#if defined(KILN_GEMV_WGMMA)
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  int state = known[device % 64].load();
  if (state == 0) {
    int major = 0, minor = 0;
    CheckCuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), name,
              "cudaDeviceGetAttribute");
    CheckCuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), name,
              "cudaDeviceGetAttribute");
    state = major == 9 && minor == 0 ? 2 : 1;
    known[device % 64].store(state);
  }
  return state == 2;
#else
  (void)name, (void)device;
  return false;
#endif
}

// K's splits for Q4Wgmma: 1 to 8 blocks of a cluster (their sums meet in shared memory, no
// scratch, no counters), the fewest that minimize (waves of clusters) x (a block's sub-steps +
// its fixed cost: 4, and 3 more when split). `clusters(s)`: how many clusters of s blocks the GPU
// holds at once. A split keeps at least 4 sub-steps. The fixed costs, in sub-steps at 64 rows of
// x, from an H200 (bench/q4_batched.py): costs of 2 and 1 split the 7B's gate_up (86 columns)
// 3 ways, 51.4 us against 47.8 unsplit; o (16 columns, 4 sub-steps a block at 8 splits) takes
// 16.5 us, down (11 a block) 28.1.
template <typename Clusters>
int WgmmaSplits(int64_t columns, int64_t k, Clusters clusters) {
  const int64_t steps = k / 128;
  int best = 1;
  double best_cost = 0;
  for (int s = 1; s <= kWgmmaMaxSplits && (s == 1 || steps / s >= 4); ++s) {
    const int64_t held = std::max<int64_t>(1, clusters(s));
    const double cost = static_cast<double>((columns + held - 1) / held) *
                        ((steps + s - 1) / s + 4 + (s > 1 ? 3 : 0));
    if (s == 1 || cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

// fn(std::integral_constant<int, kN>{}): Q4Wgmma's width kN for `m_rows` (1 to kWgmmaMaxN) rows
// of x.
template <typename Fn>
auto WithWgmmaWidth(int64_t m_rows, Fn fn) {
  if (m_rows <= 16) return fn(std::integral_constant<int, 16>{});
  if (m_rows <= 32) return fn(std::integral_constant<int, 32>{});
  if (m_rows <= 64) return fn(std::integral_constant<int, 64>{});
  return fn(std::integral_constant<int, 128>{});
}

// Q4Wgmma<kN>'s column blocks for N weight rows.
template <int kN>
int64_t WgmmaColumns(int64_t rows) {
  return (rows + WgmmaRows<kN>() - 1) / WgmmaRows<kN>();
}

// Q4Wgmma<kN>'s launch: `splits` blocks a column as a cluster (1: none) on `stream`.
template <int kN>
cudaLaunchConfig_t WgmmaLaunch(int64_t columns, int splits, cudaStream_t stream,
                               cudaLaunchAttribute* cluster) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(columns), splits);
  config.blockDim = dim3(WgmmaThreads<kN>());
  config.dynamicSmemBytes = WgmmaSmemBytes<kN>();
  config.stream = stream;
  cluster->id = cudaLaunchAttributeClusterDimension;
  cluster->val.clusterDim.x = 1, cluster->val.clusterDim.y = splits, cluster->val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = splits > 1 ? 1 : 0;
  return config;
}

template <int kN>
void OptInWgmma(const char* name, int device) {
  static std::atomic<uint64_t> opted_in{0};
  OptInSharedMemory(Q4Wgmma<kN>, WgmmaSmemBytes<kN>(), device, opted_in, name);
}

// Clusters of `s` Q4Wgmma<kN> blocks `device` holds at once, asked once a device and size.
template <int kN>
int WgmmaClusters(const char* name, int device, int s) {
  static std::atomic<int> held[64][kWgmmaMaxSplits];  // + 1: 0 is "not asked"
  std::atomic<int>& known = held[device % 64][s - 1];
  int n = known.load();
  if (n == 0) {
    OptInWgmma<kN>(name, device);
    cudaLaunchAttribute cluster;
    cudaLaunchConfig_t config = WgmmaLaunch<kN>(s, s, nullptr, &cluster);
    config.numAttrs = 1;
    CheckCuda(cudaOccupancyMaxActiveClusters(&n, Q4Wgmma<kN>, &config), name,
              "cudaOccupancyMaxActiveClusters");
    known.store(n = std::max(n, 0) + 1);
  }
  return n - 1;
}

// Q4Wgmma<kN>'s splits for `columns` column blocks and K: `forced` (1 to kWgmmaMaxSplits, for
// tests; at most K / 128) or WgmmaSplits' choice, and 1 where the device holds no cluster of them.
template <int kN>
int WgmmaPlan(const char* name, int device, int64_t columns, int k, int forced = 0) {
  auto clusters = [&](int s) { return WgmmaClusters<kN>(name, device, s); };
  const int splits = forced > 0 ? std::min(forced, k / 128) : WgmmaSplits(columns, k, clusters);
  return splits > 1 && clusters(splits) >= 1 ? splits : 1;
}

template <int kN>
void LaunchWgmma(const char* name, GemmArgs a, int device, cudaStream_t stream, int forced = 0) {
  OptInWgmma<kN>(name, device);
  const int64_t columns = WgmmaColumns<kN>(a.rows);
  a.splits = WgmmaPlan<kN>(name, device, columns, a.k, forced);
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t config = WgmmaLaunch<kN>(columns, a.splits, stream, &cluster);
  CheckCuda(cudaLaunchKernelEx(&config, Q4Wgmma<kN>, a), name, "the kernel launch");
}

// Whether a q4 call's Q4Gemm can run as Q4Wgmma: on a GPU that runs it, K % 128 == 0 and a row's
// 4 scales of a sub-step one 8-byte copy.
bool TakesWgmma(const char* name, const Q4Call& call) {
  return call.a.k % 128 == 0 && reinterpret_cast<uintptr_t>(call.a.scale) % 8 == 0 &&
         WgmmaRuns(name, call.device);
}

// Q4Gemm over x's rows, kGemmMaxM a kernel (Q4Wgmma where it can, unless `mma_only`: kWgmmaMaxN
// a kernel); `w` (N, K) float16 scratch holds Q4Gemm's splits' sums.
void RunGemm(const char* name, const Q4Call& call, const Tensor& w, cudaStream_t stream,
             bool mma_only = false, int forced_splits = 0) {
  const bool wgmma = !mma_only && TakesWgmma(name, call);
  GemmArgs a{};
  a.w = static_cast<const uint4*>(call.a.w);
  a.scale = call.a.scale;
  a.scales8 = (call.a.k / 32) % 4 == 0 && reinterpret_cast<uintptr_t>(a.scale) % 8 == 0;
  a.vector_out = call.a.rows % 4 == 0 && reinterpret_cast<uintptr_t>(call.a.out) % 8 == 0;
  a.partial = reinterpret_cast<float*>(DataOf(w));
  a.counters = wgmma ? nullptr : GemmCounters(name, call.device, stream);  // Q4Gemm's splits
  a.k = call.a.k;
  a.rows = call.a.rows;
  const int per_kernel = wgmma ? kWgmmaMaxN : kGemmMaxM;
  for (int first = 0; first < call.a.m_rows; first += per_kernel) {
    a.x = call.a.x + static_cast<int64_t>(first) * a.k;
    a.out = call.a.out + static_cast<int64_t>(first) * a.rows;
    a.m_rows = std::min(call.a.m_rows - first, per_kernel);
    if (wgmma) {
      WithWgmmaWidth(a.m_rows, [&](auto n) {
        LaunchWgmma<decltype(n)::value>(name, a, call.device, stream, forced_splits);
      });
      continue;
    }
    switch ((a.m_rows + 7) / 8) {
      // 16-row warps for 32 rows of x, 32-row warps else: the faster on the 7B's matrices (H200,
      // bench/q4_batched.py: 131.9 against 146.9 us for a layer's four at 32 rows, 218.8 against
      // 190.0 at 64)
      case 1: case 2: LaunchGemm<2, 2>(name, a, call.device, stream); break;
      case 3: case 4: LaunchGemm<4, 1>(name, a, call.device, stream); break;
      default: LaunchGemm<8, 2>(name, a, call.device, stream); break;
    }
  }
}

// q4 for a batched decode (the rows: kMaxGemmRows above); `w` (N, K) float16 is scratch the
// caller provides: Q4Gemm's partial sums, or the dequantized weight for the GEMM extern.
void Q4Batched(Tensor x, Tensor qweight, Tensor scale, Tensor out, Tensor w) {
  const char* name = kQ4Batched;
  const Q4Call call = CheckQ4(name, 0, false, x, qweight, scale, out);
  CheckScratch(name, w, call.a.rows, call.a.k, call.device);
  cudaStream_t stream = TvmStream(name, call.device);
  if (call.a.m_rows <= kMaxM) {
    LaunchVariant(name, 0, false, call.a, call.vector_scales, call.device, stream);
    return;
  }
  if (call.a.m_rows <= (TakesWgmma(name, call) ? kMaxWgmmaRows : kMaxGemmRows)) {
    return RunGemm(name, call, w, stream);
  }
  const auto gemm = tvm::ffi::Function::GetGlobal(kGemm);
  TVM_FFI_CHECK(gemm.has_value(), RuntimeError)
      << name << " multiplies " << call.a.m_rows << " rows on " << kGemm
      << ", which is not loaded: load the artifact's externs (kiln.runtime.externs)";
  LaunchDequantize(name, call, w, stream);
  (*gemm)(x, w, out);
}

// For tests and benchmarks: Q4Gemm for any rows of x (on the warpgroup MMAs where they run),
// and the mma.sync kernel alone.
void RunGemmEntry(const char* name, bool mma_only, const Tensor& x, const Tensor& qweight,
                  const Tensor& scale, const Tensor& out, const Tensor& w) {
  const Q4Call call = CheckQ4(name, 0, false, x, qweight, scale, out);
  CheckScratch(name, w, call.a.rows, call.a.k, call.device);
  RunGemm(name, call, w, TvmStream(name, call.device), mma_only);
}

void Q4GemmEntry(Tensor x, Tensor qweight, Tensor scale, Tensor out, Tensor w) {
  RunGemmEntry(kQ4Gemm, false, x, qweight, scale, out, w);
}

void Q4GemmMma(Tensor x, Tensor qweight, Tensor scale, Tensor out, Tensor w) {
  RunGemmEntry(kQ4GemmMma, true, x, qweight, scale, out, w);
}

// For tests: Q4Wgmma with K split over `splits` blocks of a cluster (1 to kWgmmaMaxSplits, at
// most K / 128), where it runs.
void Q4GemmSplits(int64_t splits, Tensor x, Tensor qweight, Tensor scale, Tensor out, Tensor w) {
  const char* name = kQ4GemmSplits;
  TVM_FFI_CHECK(splits >= 1 && splits <= kWgmmaMaxSplits, ValueError)
      << name << ": splits must be 1 to " << kWgmmaMaxSplits << ", not " << splits;
  const Q4Call call = CheckQ4(name, 0, false, x, qweight, scale, out);
  CheckScratch(name, w, call.a.rows, call.a.k, call.device);
  TVM_FFI_CHECK(TakesWgmma(name, call), ValueError)
      << name << " runs Q4Wgmma, which needs a compute capability 9.0 GPU, a library built for "
      << "sm_90a, K % 128 == 0 and 8-byte aligned scales";
  RunGemm(name, call, w, TvmStream(name, call.device), false, static_cast<int>(splits));
}

// For benchmarks: the splits of K q4_gemm takes on cuda:`device` for `m_rows` rows of x and an
// (N, K) weight; 0 where it runs the mma.sync kernel (Q4Gemm's splits are not reported).
int64_t Q4GemmPlan(int64_t m_rows, int64_t n, int64_t k, int64_t device) {
  const char* name = kQ4GemmPlan;
  TVM_FFI_CHECK(m_rows >= 1 && n >= 1 && k >= 32 && k % 32 == 0, ValueError)
      << name << ": rows of x, N and K (a multiple of 32) must be positive";
  const int id = static_cast<int>(device);
  if (k % 128 != 0 || !WgmmaRuns(name, id)) return 0;
  return WithWgmmaWidth(std::min<int64_t>(m_rows, kWgmmaMaxN), [&](auto width) {
    constexpr int kN = decltype(width)::value;
    return int64_t{WgmmaPlan<kN>(name, id, WgmmaColumns<kN>(n), static_cast<int>(k))};
  });
}

// For tests: whether kiln.gemv.q4_gemm runs on the warpgroup MMAs on cuda:`device`.
bool Q4GemmWgmma(int64_t device) {
  return WgmmaRuns(kQ4GemmWgmma, static_cast<int>(device));
}

// For tests: the weight Q4Batched multiplies by past kMaxGemmRows (kMaxWgmmaRows) rows.
void Q4Dequantize(Tensor qweight, Tensor scale, Tensor w) {
  const char* name = kQ4Dequantize;
  TVM_FFI_CHECK(qweight.ndim() == 2, ValueError) << name << ": qweight must be (N, K / 8)";
  Q4Call call{};
  call.device = qweight.device().device_id;
  CheckDtype(name, qweight, "qweight", kDLUInt, 32, "uint32");
  CheckDtype(name, scale, "scale", kDLFloat, 16, "float16");
  CheckPlacement(name, qweight, "qweight", call.device, false);
  CheckPlacement(name, scale, "scale", call.device, false);
  call.a.rows = static_cast<int>(qweight.size(0));
  call.a.k = static_cast<int>(qweight.size(1) * 8);
  TVM_FFI_CHECK(call.a.k % 32 == 0 && scale.ndim() == 2 && scale.size(0) == call.a.rows &&
                    scale.size(1) == call.a.k / 32,
                ValueError)
      << name << ": scale must be (N, K / 32) for K a multiple of 32";
  CheckScratch(name, w, call.a.rows, call.a.k, call.device);
  call.a.w = DataOf(qweight);
  call.a.scale = reinterpret_cast<const half*>(DataOf(scale));
  LaunchDequantize(name, call, w, TvmStream(name, call.device));
}

void F16SwiGLUEntry(Tensor x, Tensor w, Tensor out) {
  const char* name = kF16SwiGLU;
  const int64_t k = CheckK(name, x);
  CheckDtype(name, w, "w", kDLFloat, 16, "float16");
  TVM_FFI_CHECK(w.ndim() == 2 && w.size(1) == k, ValueError)
      << name << ": w must be (2 I, K) with x's K = " << k;
  Args a = CheckActivations(name, x, out, SwiGLURows(name, w.size(0)));
  const int device = PlaceActivations(name, x, out, &a);
  CheckPlacement(name, w, "w", device, true);
  a.w = DataOf(w);
  cudaStream_t stream = TvmStream(name, device);
  if (a.m_rows == 1) {
    F16SwiGLURow<<<static_cast<unsigned>((a.rows + kF16RowOutputs - 1) / kF16RowOutputs),
                   kThreads, 0, stream>>>(a);
    CheckCuda(cudaGetLastError(), name, "the kernel launch");
    return;
  }
  ForEachChunk(a, [&](const Args& chunk) {
    F16SwiGLU<<<static_cast<unsigned>((a.rows + kRows - 1) / kRows), kThreads, 0, stream>>>(
        chunk);
    CheckCuda(cudaGetLastError(), name, "the kernel launch");
  });
}

// The mixture's kernels (Q4MoeSwiGLU, Q4MoeDown), packed arguments (x, gate, qweight_0,
// scale_0, ..., qweight_E-1, scale_E-1, out), E = 1 .. kMaxExperts, every expert's weights of
// one shape and x's rows M = 1 .. kMaxM (the product of `lead`, the dimensions below):
//   q4_moe_swiglu: x (lead..., K), gate (lead..., E), qweight_e (2 I, K / 8), out (E, lead..., I)
//   q4_moe:        x (E, lead..., K), gate (lead..., E), qweight_e (N, K / 8), out (lead..., N)
MoeArgs CheckMoe(const char* name, bool swiglu, const tvm::ffi::PackedArgs& args, int* device,
                 bool* vector_scales) {
  const int n = args.size();
  TVM_FFI_CHECK(n >= 5 && (n - 3) % 2 == 0 && (n - 3) / 2 <= kMaxExperts, ValueError)
      << name << " takes (x, gate, qweight_0, scale_0, ..., out) for 1 to " << kMaxExperts
      << " experts, not " << n << " arguments";
  const Tensor x = args[0].cast<Tensor>(), gate = args[1].cast<Tensor>();
  const Tensor out = args[n - 1].cast<Tensor>();
  MoeArgs m{};
  m.experts = (n - 3) / 2;
  const int64_t k = CheckK(name, x);
  CheckDtype(name, x, "x", kDLFloat, 16, "float16");
  CheckDtype(name, gate, "gate", kDLFloat, 16, "float16");
  CheckDtype(name, out, "out", kDLFloat, 16, "float16");
  // x's and out's leading dimensions past the expert axis must be gate's (lead..., E)
  const Tensor& stacked = swiglu ? out : x;  // the tensor with the expert axis first
  const Tensor& flat = swiglu ? x : out;
  bool same = gate.ndim() >= 1 && gate.size(gate.ndim() - 1) == m.experts &&
              flat.ndim() == gate.ndim() && stacked.ndim() == gate.ndim() + 1 &&
              stacked.size(0) == m.experts;
  int64_t rows_of_x = 1;
  for (int d = 0; same && d + 1 < gate.ndim(); ++d) {
    same = flat.size(d) == gate.size(d) && stacked.size(d + 1) == gate.size(d);
    rows_of_x *= gate.size(d);
  }
  TVM_FFI_CHECK(same, ValueError)
      << name << ": gate must be (lead..., " << m.experts << "), "
      << (swiglu ? "x (lead..., K) and out (E, lead..., I)"
                 : "x (E, lead..., K) and out (lead..., N)")
      << " with E = " << m.experts << " (one qweight and one scale an expert)";
  TVM_FFI_CHECK(rows_of_x >= 1 && rows_of_x <= kMaxM, ValueError)
      << name << " takes 1 to " << kMaxM << " rows of x, not " << rows_of_x;
  const Tensor q0 = args[2].cast<Tensor>();
  const int64_t weight_rows = q0.ndim() == 2 ? q0.size(0) : 0;
  const int64_t rows = swiglu ? SwiGLURows(name, weight_rows) : weight_rows;
  TVM_FFI_CHECK(rows >= 1 && rows < (int64_t{1} << 30) && out.size(out.ndim() - 1) == rows,
                ValueError)
      << name << ": out's last dimension must be the experts' output rows (" << rows << ")";
  *device = x.device().device_id;
  CheckPlacement(name, x, "x", *device, true);
  CheckPlacement(name, gate, "gate", *device, false);
  CheckPlacement(name, out, "out", *device, false);
  *vector_scales = (k / 32) % 8 == 0;
  for (int e = 0; e < m.experts; ++e) {
    const Tensor qweight = args[2 + 2 * e].cast<Tensor>();
    const Tensor scale = args[3 + 2 * e].cast<Tensor>();
    CheckDtype(name, qweight, "qweight", kDLUInt, 32, "uint32");
    CheckDtype(name, scale, "scale", kDLFloat, 16, "float16");
    TVM_FFI_CHECK(qweight.ndim() == 2 && scale.ndim() == 2 && qweight.size(0) == weight_rows &&
                      qweight.size(1) == k / 8 && scale.size(0) == weight_rows &&
                      scale.size(1) == k / 32,
                  ValueError)
        << name << ": expert " << e << "'s qweight must be (" << weight_rows << ", " << k / 8
        << ") and scale (" << weight_rows << ", " << k / 32 << "), as expert 0's and x's K";
    CheckPlacement(name, qweight, "qweight", *device, true);
    CheckPlacement(name, scale, "scale", *device, false);
    m.w[e] = DataOf(qweight);
    m.scale[e] = reinterpret_cast<const half*>(DataOf(scale));
    *vector_scales = *vector_scales && Aligned16(scale);
  }
  m.gate = reinterpret_cast<const half*>(DataOf(gate));
  m.a.x = reinterpret_cast<const half*>(DataOf(x));
  m.a.out = reinterpret_cast<half*>(DataOf(out));
  m.a.m_rows = static_cast<int>(rows_of_x);
  m.a.k = static_cast<int>(k);
  m.a.rows = static_cast<int>(rows);
  return m;
}

template <bool kSwiGLU, bool kVectorScales>
void LaunchMoe(const char* name, const MoeArgs& m, int device, cudaStream_t stream) {
  auto kernel = kSwiGLU ? Q4MoeSwiGLU<kVectorScales> : Q4MoeDown<kVectorScales>;
  const size_t smem = size_t{kXBytesPerRow} * m.a.m_rows;
  static std::atomic<uint64_t> opted_in{0};
  if (smem > 32 * 1024) OptInSharedMemory(kernel, kXBytesPerRow * kMaxM, device, opted_in, name);
  constexpr int per_block = OutputsPerBlock<1, kSwiGLU>();
  const unsigned blocks = static_cast<unsigned>((m.a.rows + per_block - 1) / per_block);
  kernel<<<blocks, kThreads, smem, stream>>>(m);
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

template <bool kSwiGLU>
void RunMoe(const char* name, tvm::ffi::PackedArgs args) {
  int device = 0;
  bool vector_scales = false;
  const MoeArgs m = CheckMoe(name, kSwiGLU, args, &device, &vector_scales);
  cudaStream_t stream = TvmStream(name, device);
  vector_scales ? LaunchMoe<kSwiGLU, true>(name, m, device, stream)
                : LaunchMoe<kSwiGLU, false>(name, m, device, stream);
}

// moe_route(x (lead..., K) f16, gate (E, K) f16, top_k, out (lead..., E) f16): MoeRoute, a
// block a row of x; E = 1 .. kMaxExperts, 1 <= top_k <= E.
void MoeRouteEntry(Tensor x, Tensor gate, int64_t top_k, Tensor out) {
  const char* name = kMoeRoute;
  const int64_t k = CheckK(name, x);
  CheckDtype(name, gate, "gate", kDLFloat, 16, "float16");
  TVM_FFI_CHECK(gate.ndim() == 2 && gate.size(1) == k && gate.size(0) >= 1 &&
                    gate.size(0) <= kMaxExperts,
                ValueError)
      << name << ": gate must be (E, K) with x's K = " << k << " and E = 1 .. " << kMaxExperts;
  const int64_t experts = gate.size(0);
  TVM_FFI_CHECK(top_k >= 1 && top_k <= experts, ValueError)
      << name << ": top_k is " << top_k << "; it must be 1 .. " << experts << " (E)";
  Args a = CheckActivations(name, x, out, experts);
  const int device = PlaceActivations(name, x, out, &a);
  CheckPlacement(name, gate, "gate", device, true);
  int slices = std::max<int>(1, kRouteWarps / static_cast<int>(experts));
  while (slices > 1 && k % (8 * slices) != 0) slices /= 2;
  cudaStream_t stream = TvmStream(name, device);
  MoeRoute<<<static_cast<unsigned>(a.m_rows), kRouteWarps * 32, 0, stream>>>(
      a.x, reinterpret_cast<const half*>(DataOf(gate)), a.out, a.k, static_cast<int>(experts),
      static_cast<int>(top_k), slices);
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

// add_rms_norm(x (..., H) f16, r (..., H) f16, w (H) f16, epsilon, s, y (..., H) f16):
// AddRMSNorm, a block a row; H a multiple of 8, at most 8 kNormThreads kNormPieces.
void AddRMSNormEntry(Tensor x, Tensor r, Tensor w, double epsilon, Tensor s, Tensor y) {
  const char* name = kAddRMSNorm;
  const Tensor* all[] = {&x, &r, &w, &s, &y};
  const char* what[] = {"x", "r", "w", "s", "y"};
  for (int i = 0; i < 5; ++i) CheckDtype(name, *all[i], what[i], kDLFloat, 16, "float16");
  TVM_FFI_CHECK(x.ndim() >= 1, ValueError) << name << ": x must have at least one dimension";
  const int64_t hidden = x.size(x.ndim() - 1);
  TVM_FFI_CHECK(hidden % 8 == 0 && hidden >= 8 && hidden <= 8 * kNormThreads * kNormPieces,
                ValueError)
      << name << ": the last dimension must be a multiple of 8 from 8 to "
      << 8 * kNormThreads * kNormPieces << ", not " << hidden;
  for (const Tensor* t : {&r, &s, &y}) {
    TVM_FFI_CHECK(t->ndim() == x.ndim(), ValueError) << name << ": r, s and y must be shaped as x";
    for (int d = 0; d < x.ndim(); ++d) {
      TVM_FFI_CHECK(t->size(d) == x.size(d), ValueError)
          << name << ": r, s and y must be shaped as x";
    }
  }
  TVM_FFI_CHECK(w.ndim() == 1 && w.size(0) == hidden, ValueError)
      << name << ": w must be (" << hidden << ",), x's last dimension";
  TVM_FFI_CHECK(epsilon >= 0, ValueError) << name << ": epsilon must be >= 0, not " << epsilon;
  int64_t rows = 1;
  for (int d = 0; d + 1 < x.ndim(); ++d) rows *= x.size(d);
  TVM_FFI_CHECK(rows < (int64_t{1} << 31), ValueError) << name << ": too many rows";
  const int device = x.device().device_id;
  for (int i = 0; i < 5; ++i) CheckPlacement(name, *all[i], what[i], device, true);
  if (rows == 0) return;
  cudaStream_t stream = TvmStream(name, device);
  AddRMSNorm<<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(
      reinterpret_cast<const half*>(DataOf(x)), reinterpret_cast<const half*>(DataOf(r)),
      reinterpret_cast<const half*>(DataOf(w)), reinterpret_cast<half*>(DataOf(s)),
      reinterpret_cast<half*>(DataOf(y)), static_cast<int>(hidden), static_cast<float>(epsilon));
  CheckCuda(cudaGetLastError(), name, "the kernel launch");
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def(kQ4, Q4)
      .def(kQ4SwiGLU, Q4SwiGLU)
      .def(kF16SwiGLU, F16SwiGLUEntry)
      .def(kAddRMSNorm, AddRMSNormEntry)
      .def(kQ4Batched, Q4Batched)
      .def(kQ4Dequantize, Q4Dequantize)
      .def(kQ4Gemm, Q4GemmEntry)
      .def(kQ4GemmMma, Q4GemmMma)
      .def(kQ4GemmWgmma, Q4GemmWgmma)
      .def(kQ4GemmSplits, Q4GemmSplits)
      .def(kQ4GemmPlan, Q4GemmPlan)
      .def_packed(kQ4MoeSwiGLU,
                  [](tvm::ffi::PackedArgs args, tvm::ffi::Any*) {
                    RunMoe<true>(kQ4MoeSwiGLU, args);
                  })
      .def_packed(kQ4Moe,
                  [](tvm::ffi::PackedArgs args, tvm::ffi::Any*) { RunMoe<false>(kQ4Moe, args); })
      .def(kMoeRoute, MoeRouteEntry)
      // For benchmarks and tests: q4 and q4 SwiGLU with the variant fixed (0: the default; see
      // kVariants), the default's choice, and a variant's time in a CUDA graph
      .def(kQ4Tiled, Q4Tiled)
      .def(kQ4SwiGLUTiled, Q4SwiGLUTiled)
      .def(kQ4DefaultVariant, Q4DefaultVariant)
      .def(kQ4GraphTime, Q4GraphTime);
}

}  // namespace gemv
}  // namespace kiln
