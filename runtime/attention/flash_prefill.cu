// Kiln's prefill attention: `kiln.attention.prefill_ragged`, a FlashAttention-2 style kernel on
// the tensor cores that stands in for TVM's `batch_prefill_ragged_kv` in the paged KV cache.
//
// The contract is that TIR kernel's argument list, which TVM's C++ cache calls (attn_backend.h,
// TIRRaggedPrefillFunc) whenever a prefill chunk attends to its own keys:
//
//   (q (total_q, h_q, d), q_indptr (batch + 1) int32, k (total_kv, h_kv, d),
//    v (total_kv, h_kv, d), kv_indptr (batch + 1) int32, q_rope_position (total_q) int32,
//    k_rope_pos_offset (batch) int32, output (total_q, h_q, d), lse (total_q, h_q) float32,
//    int causal, int rotary_mode, float rope_scale, float rope_theta, float sm_scale)
//
// Sequence b owns q rows q_indptr[b] .. q_indptr[b + 1] and k/v rows kv_indptr[b] ..
// kv_indptr[b + 1]. With `causal`, row r of a sequence of q_len queries and kv_len keys sees
// the keys c < kv_len - q_len + r + 1 (queries aligned to the end of the keys); without it,
// every key. Scores are in the log2 domain, s = q.k * sm_scale * log2(e), and lse is
// m + log2(sum 2^(s - m)): TVM merges this state with the paged part's (merge_state_inplace),
// so both conventions must match. A row that sees no key gets output 0 and lse -5e4, the finite
// "nothing seen" score TVM's kernels start from (so a merge with it stays finite). rotary_mode 1
// (RoPE inside attention) is refused: Kiln's caches apply RoPE as q/k enter the cache
// (RopeMode.NORMAL), so the cache always passes 0, and the rope arguments are unused.
//
// Layout of the work: one thread block per (q head, q tile of kBlockM rows of one sequence),
// 4 or 8 warps, each warp 16 q rows. The block walks the sequence's keys in tiles of 64: K and V
// tiles go to shared memory with cp.async (the next K tile loads while this one's softmax and
// P.V run; the next V tile while the next S = Q.K^T runs), S and O accumulate in fp32 registers
// from mma.sync m16n8k16 (fp16 or bf16 inputs), and the softmax is the online one. Under
// `causal`, key tiles past the tile's last row are never visited and only tiles that cross a
// row's limit are masked. Blocks take tiles heaviest first (the last rows of a causal sequence
// see the most keys) and find their sequence from q_indptr on the device, so a call never
// waits for the host.
//
// Runs on TVM's current stream for the device (TVMFFIEnvGetStream), as cublas.cc does.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <atomic>
#include <cstdint>

namespace kiln {
namespace attention {

using tvm::ffi::Tensor;

constexpr int kBlockN = 64;      // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyLse = -5e4f;  // the lse of a row that sees no key (TVM's starting score)

// ---------------------------------------------------------------------------------------------
// Device helpers: PTX for cp.async, ldmatrix, mma.sync (sm_80 and newer).

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; with `valid` false, 16 zero bytes are written and nothing is read.
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src, bool valid) {
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void CommitAsync() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of the committed groups are still in flight.
template <int N>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane i gives the address of row i % 8 of matrix i / 8, and receives
// in r[m] the elements (i / 4, 2 (i % 4) + {0, 1}) of matrix m (transposed: (2 (i % 4) + {0, 1},
// i / 4)).
__device__ __forceinline__ void LoadMatrix(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void LoadMatrixTransposed(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float Exp2(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// What differs between fp16 and bf16: the MMA and packing two floats into one register (the
// first in the low half, as the MMA fragments expect).
template <typename T>
struct Types;

template <>
struct Types<half> {
  __device__ __forceinline__ static uint32_t Pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // d (16x8 fp32) += a (16x16, row-major) * b (16x8, column-major)
  __device__ __forceinline__ static void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Types<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct Params {
  const void* q;  // (total_q, h_q, d)
  const void* k;  // (total_kv, h_kv, d)
  const void* v;  // (total_kv, h_kv, d)
  void* out;      // (total_q, h_q, d)
  float* lse;     // (total_q, h_q)
  const int32_t* q_indptr;   // (batch + 1)
  const int32_t* kv_indptr;  // (batch + 1)
  int batch, h_q, h_kv, group;  // group = h_q / h_kv
  int causal;
  float scale_log2;  // sm_scale * log2(e)
};

// The sequence and q tile of the block's slot (blockIdx.y): slots number each sequence's tiles
// in turn, heaviest (last) tile first; slots past the last tile have none (false). Every warp
// finds the same answer from q_indptr, 32 sequences at a time.
template <int kBlockM>
__device__ bool FindTile(const int32_t* q_indptr, int batch, int slot, int* seq, int* tile) {
  const unsigned all = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  for (int base = 0; base < batch; base += 32) {
    int b = base + lane;
    int tiles = 0;
    if (b < batch) tiles = (max(q_indptr[b + 1] - q_indptr[b], 0) + kBlockM - 1) / kBlockM;
    int upto = tiles;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      int before = __shfl_up_sync(all, upto, offset);
      if (lane >= offset) upto += before;
    }
    int total = __shfl_sync(all, upto, 31);
    if (slot < total) {
      // The first lane whose prefix passes the slot owns it (and has tiles > 0).
      int owner = __ffs(__ballot_sync(all, slot < upto)) - 1;
      int first = __shfl_sync(all, upto - tiles, owner);
      int count = __shfl_sync(all, tiles, owner);
      *seq = base + owner;
      *tile = count - 1 - (slot - first);
      return true;
    }
    slot -= total;
  }
  return false;
}

// Rows [0, kRows) of a tile, row r from src + r * row_stride (elements), r < valid_rows, into
// shared memory with kStride elements per row; rows past valid_rows are zero.
template <typename T, int D, int kRows, int kThreads, int kStride>
__device__ __forceinline__ void LoadTile(T* dst, const T* src, int64_t row_stride, int valid_rows,
                                         const T* any_valid) {
  constexpr int kChunks = D / 8;  // 16-byte pieces of a row
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies as many pieces");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    bool valid = r < valid_rows;
    CopyAsync16(SharedAddress(dst + r * kStride + col),
                valid ? src + r * row_stride + col : any_valid, valid);
  }
}

template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) PrefillRagged(const Params p) {
  constexpr int kBlockM = 16 * kWarps;  // q rows per block
  constexpr int kThreads = 32 * kWarps;
  // Shared-memory rows are padded by 16 bytes: the 8 rows an ldmatrix reads then start 4 banks
  // apart and cover all 32 banks once.
  constexpr int kStride = D + 8;
  constexpr int kTilesN = kBlockN / 8;  // n8 tiles of S
  constexpr int kTilesD = D / 8;        // n8 tiles of O
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);  // (kBlockM, kStride)
  T* k_s = q_s + kBlockM * kStride;     // (kBlockN, kStride)
  T* v_s = k_s + kBlockN * kStride;     // (kBlockN, kStride)

  int seq, tile;
  if (!FindTile<kBlockM>(p.q_indptr, p.batch, blockIdx.y, &seq, &tile)) return;
  const int head = blockIdx.x;
  const int kv_head = head / p.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // the MMA fragments' row group and column pair

  const int q_start = p.q_indptr[seq];
  const int q_len = p.q_indptr[seq + 1] - q_start;
  const int kv_start = p.kv_indptr[seq];
  const int kv_len = p.kv_indptr[seq + 1] - kv_start;
  const int row0 = tile * kBlockM;  // the tile's first row within the sequence
  const int rows = min(kBlockM, q_len - row0);
  // Row r of the sequence sees keys [0, limit(r)).
  auto limit = [&](int r) { return p.causal ? min(kv_len, kv_len - q_len + r + 1) : kv_len; };
  const int keys = max(limit(row0 + rows - 1), 0);  // what the tile's last row sees
  const int key_tiles = (keys + kBlockN - 1) / kBlockN;
  const int unmasked = max(limit(row0), 0);  // keys every row of the tile sees
  // This thread's two rows of every fragment: g and g + 8 of the warp's 16.
  const int my_row = row0 + warp * 16 + g;
  const int row_limit[2] = {limit(my_row), limit(my_row + 8)};

  const int64_t q_stride = int64_t{p.h_q} * D, kv_stride = int64_t{p.h_kv} * D;
  const T* q = static_cast<const T*>(p.q) + (int64_t{q_start + row0} * p.h_q + head) * D;
  const T* k = static_cast<const T*>(p.k) + (int64_t{kv_start} * p.h_kv + kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (int64_t{kv_start} * p.h_kv + kv_head) * D;
  const T* any_valid = static_cast<const T*>(p.q);

  LoadTile<T, D, kBlockM, kThreads, kStride>(q_s, q, q_stride, rows, any_valid);
  if (key_tiles > 0) LoadTile<T, D, kBlockN, kThreads, kStride>(k_s, k, kv_stride, kv_len, any_valid);
  CommitAsync();

  uint32_t q_frag[D / 16][4];     // the warp's 16 rows of Q as MMA A fragments
  float o[kTilesD][4];            // O (16 x D), fp32, unnormalized
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's part; the 4 threads of a row add up at the end
#pragma unroll
  for (int i = 0; i < kTilesD; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  for (int j = 0; j < key_tiles; ++j) {
    const int key0 = j * kBlockN;
    LoadTile<T, D, kBlockN, kThreads, kStride>(v_s, v + key0 * kv_stride, kv_stride,
                                               kv_len - key0, any_valid);
    CommitAsync();
    WaitAsync<1>();  // Q and this K tile have landed (this V tile may still be on its way)
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        LoadMatrix(q_frag[kk], SharedAddress(q_s + (warp * 16 + lane % 16) * kStride + kk * 16 +
                                             (lane / 16) * 8));
      }
    }

    // S (16 x 64) = Q K^T. K rows are keys, so they are B's columns: ldmatrix without
    // transposition; matrices 0, 1 are keys 0-7 of the pair (d 0-7, 8-15), 2, 3 keys 8-15.
    float s[kTilesN][4];
#pragma unroll
    for (int i = 0; i < kTilesN; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < kTilesN / 2; ++n) {
        uint32_t b[4];
        const int m = lane / 8;
        LoadMatrix(b, SharedAddress(k_s + (n * 16 + (m >> 1) * 8 + lane % 8) * kStride + kk * 16 +
                                    (m & 1) * 8));
        Types<T>::Mma(s[2 * n], q_frag[kk], b[0], b[1]);
        Types<T>::Mma(s[2 * n + 1], q_frag[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this K tile: load the next one over it
    if (j + 1 < key_tiles) {
      LoadTile<T, D, kBlockN, kThreads, kStride>(k_s, k + (key0 + kBlockN) * kv_stride, kv_stride,
                                                 kv_len - key0 - kBlockN, any_valid);
    }
    CommitAsync();  // (an empty group on the last tile keeps the waits' counting uniform)

    // Online softmax in the log2 domain. s[n][i]: row g (i < 2) or g + 8, key
    // key0 + 8 n + 2 t + (i & 1).
    const bool masked = key0 + kBlockN > unmasked;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kTilesN; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[n][2 * h + e] * p.scale_log2;
          if (masked && key0 + 8 * n + 2 * t + e >= row_limit[h]) x = -INFINITY;
          s[n][2 * h + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[h], tile_max);
      // A row that has seen no key yet keeps max -inf; subtract 0 instead (all its terms are 0).
      const float base = new_max == -INFINITY ? 0.f : new_max;
      const float rescale = Exp2(row_max[h] - base);
      row_max[h] = new_max;
      row_sum[h] *= rescale;
#pragma unroll
      for (int n = 0; n < kTilesN; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float e2 = Exp2(s[n][2 * h + e] - base);
          s[n][2 * h + e] = e2;
          row_sum[h] += e2;
        }
      }
#pragma unroll
      for (int i = 0; i < kTilesD; ++i) {
        o[i][2 * h] *= rescale;
        o[i][2 * h + 1] *= rescale;
      }
    }

    WaitAsync<1>();  // this V tile has landed (the next K tile may still be on its way)
    __syncthreads();
    // O (16 x D) += P (16 x 64) V (64 x D). The S accumulators of keys 16 kk .. 16 kk + 15 are
    // P's A fragment for that k-step as they are; V rows are keys, so ldmatrix transposes: its
    // matrices 0, 1 are keys 0-7, 8-15 of d 0-7 of the pair, 2, 3 of d 8-15.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4] = {
          Types<T>::Pack(s[2 * kk][0], s[2 * kk][1]), Types<T>::Pack(s[2 * kk][2], s[2 * kk][3]),
          Types<T>::Pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
          Types<T>::Pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < kTilesD / 2; ++n) {
        uint32_t b[4];
        const int m = lane / 8;
        LoadMatrixTransposed(b, SharedAddress(v_s + (kk * 16 + (m & 1) * 8 + lane % 8) * kStride +
                                              n * 16 + (m >> 1) * 8));
        Types<T>::Mma(o[2 * n], a, b[0], b[1]);
        Types<T>::Mma(o[2 * n + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this V tile before the next one overwrites it
  }
  WaitAsync<0>();  // nothing may still be writing shared memory (no key tile: Q's load)
  __syncthreads();

  // Normalize; stage the warp's 16 rows in its own rows of q_s (only this warp read them), then
  // write them out 16 bytes at a time.
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[h] = sum > 0.f ? 1.f / sum : 0.f;
    const int r = my_row + 8 * h;
    if (t == 0 && r < q_len) {
      p.lse[int64_t{q_start + r} * p.h_q + head] =
          sum > 0.f ? row_max[h] + log2f(sum) : kEmptyLse;
    }
  }
  T* stage = q_s + warp * 16 * kStride;
#pragma unroll
  for (int i = 0; i < kTilesD; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<uint32_t*>(stage + (g + 8 * h) * kStride + i * 8 + 2 * t) =
          Types<T>::Pack(o[i][2 * h] * inv[h], o[i][2 * h + 1] * inv[h]);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + (int64_t{q_start + row0 + warp * 16} * p.h_q + head) * D;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + warp * 16 + r < q_len) {
      *reinterpret_cast<uint4*>(out + r * q_stride + col) =
          *reinterpret_cast<const uint4*>(stage + r * kStride + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

void CheckCuda(cudaError_t result, const char* what) {
  if (result != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "kiln.attention.prefill_ragged: " << what
                                << " failed: " << cudaGetErrorString(result);
  }
}

template <typename T, int D, int kWarps>
void Launch(const Params& p, int64_t total_q, int device, cudaStream_t stream) {
  constexpr int kBlockM = 16 * kWarps;
  constexpr size_t kSmem = size_t{kBlockM + 2 * kBlockN} * (D + 8) * sizeof(T);
  auto kernel = PrefillRagged<T, D, kWarps>;
  if (kSmem > 48 * 1024) {  // past 48 KiB a block must opt in, once per device
    static std::atomic<uint64_t> opted_in{0};
    const uint64_t bit = uint64_t{1} << (device % 64);
    if (!(opted_in.load() & bit)) {
      CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(kSmem)),
                "cudaFuncSetAttribute");
      opted_in.fetch_or(bit);
    }
  }
  // Each sequence's tiles, all together, number at most ceil(total_q / kBlockM) + batch.
  const int64_t slots = (total_q + kBlockM - 1) / kBlockM + p.batch;
  TVM_FFI_CHECK(slots <= 65535, ValueError)
      << "kiln.attention.prefill_ragged: " << total_q << " queries in " << p.batch
      << " sequences are more than one call takes";
  dim3 grid(p.h_q, static_cast<unsigned>(slots));
  kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
  CheckCuda(cudaGetLastError(), "the kernel launch");
}

int SmCount(int device) {
  static std::atomic<int> counts[64];
  int n = counts[device % 64].load();
  if (n == 0) {
    CheckCuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
              "cudaDeviceGetAttribute");
    counts[device % 64].store(n);
  }
  return n;
}

// 128-row tiles halve the K/V traffic per query but make half as many blocks: take them only
// when there are blocks enough to fill every SM a few times over.
int AutoTileRows(int64_t total_q, int h_q, int device) {
  const int64_t blocks_at_128 = (total_q + 127) / 128 * h_q;
  return blocks_at_128 >= 4 * int64_t{SmCount(device)} ? 128 : 64;
}

template <typename T, int D>
void LaunchRows(const Params& p, int64_t total_q, int tile_rows, int device, cudaStream_t stream) {
  if (tile_rows == 128) {
    Launch<T, D, 8>(p, total_q, device, stream);
  } else {
    Launch<T, D, 4>(p, total_q, device, stream);
  }
}

const char* Name() { return "kiln.attention.prefill_ragged"; }

void CheckTensor(const Tensor& t, const char* name, int ndim, int device) {
  TVM_FFI_CHECK(t.ndim() == ndim, ValueError)
      << Name() << ": " << name << " must have " << ndim << " dimensions, it has " << t.ndim();
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA && t.device().device_id == device, ValueError)
      << Name() << ": " << name << " must be on cuda:" << device << ", it is on device "
      << t.device().device_type << ":" << t.device().device_id;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << Name() << ": " << name << " must be contiguous";
}

void CheckDtype(const Tensor& t, const char* name, DLDataTypeCode code, int bits) {
  DLDataType d = t.dtype();
  TVM_FFI_CHECK(d.code == code && d.bits == bits && d.lanes == 1, TypeError)
      << Name() << ": " << name << " has dtype code=" << static_cast<int>(d.code)
      << " bits=" << static_cast<int>(d.bits) << ", expected code=" << static_cast<int>(code)
      << " bits=" << bits;
}

char* DataOf(const Tensor& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

// `tile_rows`: 64, 128, or 0 to choose by the amount of work.
void PrefillRaggedTiled(int64_t tile_rows, Tensor q, Tensor q_indptr, Tensor k, Tensor v,
                        Tensor kv_indptr, Tensor q_rope_position, Tensor k_rope_pos_offset,
                        Tensor out, Tensor lse, int64_t causal, int64_t rotary_mode,
                        double rope_scale, double rope_theta, double sm_scale) {
  (void)q_rope_position, (void)k_rope_pos_offset, (void)rope_scale, (void)rope_theta;
  TVM_FFI_CHECK(rotary_mode == 0, ValueError)
      << Name() << " does not apply RoPE (rotary_mode " << rotary_mode
      << "): Kiln's KV caches apply it as q and k enter the cache";
  TVM_FFI_CHECK(tile_rows == 0 || tile_rows == 64 || tile_rows == 128, ValueError)
      << Name() << ": tile_rows must be 0, 64 or 128, not " << tile_rows;
  const int device = q.device().device_id;
  CheckTensor(q, "q", 3, device);
  CheckTensor(k, "k", 3, device);
  CheckTensor(v, "v", 3, device);
  CheckTensor(out, "output", 3, device);
  CheckTensor(lse, "lse", 2, device);
  CheckTensor(q_indptr, "q_indptr", 1, device);
  CheckTensor(kv_indptr, "kv_indptr", 1, device);
  const DLDataType dt = q.dtype();
  const bool fp16 = dt.code == kDLFloat && dt.bits == 16 && dt.lanes == 1;
  const bool bf16 = dt.code == kDLBfloat && dt.bits == 16 && dt.lanes == 1;
  TVM_FFI_CHECK(fp16 || bf16, TypeError) << Name() << " takes float16 or bfloat16 q, k and v";
  const auto code = static_cast<DLDataTypeCode>(dt.code);
  CheckDtype(k, "k", code, 16);
  CheckDtype(v, "v", code, 16);
  CheckDtype(out, "output", code, 16);
  CheckDtype(lse, "lse", kDLFloat, 32);
  CheckDtype(q_indptr, "q_indptr", kDLInt, 32);
  CheckDtype(kv_indptr, "kv_indptr", kDLInt, 32);

  const int64_t total_q = q.size(0), h_q = q.size(1), d = q.size(2);
  const int64_t h_kv = k.size(1);
  TVM_FFI_CHECK(d == 64 || d == 128, ValueError)
      << Name() << " takes head_dim 64 or 128, not " << d;
  TVM_FFI_CHECK(h_kv > 0 && h_q % h_kv == 0, ValueError)
      << Name() << ": " << h_q << " query heads are not a multiple of " << h_kv << " KV heads";
  TVM_FFI_CHECK(k.size(2) == d && v.size(0) == k.size(0) && v.size(1) == h_kv && v.size(2) == d,
                ValueError)
      << Name() << ": k and v must both be (total_kv, " << h_kv << ", " << d << ")";
  TVM_FFI_CHECK(out.size(0) == total_q && out.size(1) == h_q && out.size(2) == d, ValueError)
      << Name() << ": output must be shaped as q";
  TVM_FFI_CHECK(lse.size(0) == total_q && lse.size(1) == h_q, ValueError)
      << Name() << ": lse must be (total_q, h_q)";
  const int64_t batch = q_indptr.size(0) - 1;
  TVM_FFI_CHECK(batch >= 0 && kv_indptr.size(0) == batch + 1, ValueError)
      << Name() << ": q_indptr and kv_indptr must have the same length";
  for (const Tensor* t : {&q, &k, &v, &out}) {
    TVM_FFI_CHECK(reinterpret_cast<uintptr_t>(DataOf(*t)) % 16 == 0, ValueError)
        << Name() << ": q, k, v and output must be 16-byte aligned";
  }
  if (total_q == 0 || batch == 0 || h_q == 0) return;

  Params p;
  p.q = DataOf(q);
  p.k = DataOf(k);
  p.v = DataOf(v);
  p.out = DataOf(out);
  p.lse = reinterpret_cast<float*>(DataOf(lse));
  p.q_indptr = reinterpret_cast<const int32_t*>(DataOf(q_indptr));
  p.kv_indptr = reinterpret_cast<const int32_t*>(DataOf(kv_indptr));
  p.batch = static_cast<int>(batch);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.group = static_cast<int>(h_q / h_kv);
  p.causal = causal != 0;
  p.scale_log2 = static_cast<float>(sm_scale) * kLog2e;

  int current = -1;
  CheckCuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) CheckCuda(cudaSetDevice(device), "cudaSetDevice");
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const int rows = tile_rows ? static_cast<int>(tile_rows) : AutoTileRows(total_q, p.h_q, device);
  if (fp16 && d == 64) LaunchRows<half, 64>(p, total_q, rows, device, stream);
  if (fp16 && d == 128) LaunchRows<half, 128>(p, total_q, rows, device, stream);
  if (bf16 && d == 64) LaunchRows<__nv_bfloat16, 64>(p, total_q, rows, device, stream);
  if (bf16 && d == 128) LaunchRows<__nv_bfloat16, 128>(p, total_q, rows, device, stream);
}

void PrefillRaggedAuto(Tensor q, Tensor q_indptr, Tensor k, Tensor v, Tensor kv_indptr,
                       Tensor q_rope_position, Tensor k_rope_pos_offset, Tensor out, Tensor lse,
                       int64_t causal, int64_t rotary_mode, double rope_scale, double rope_theta,
                       double sm_scale) {
  PrefillRaggedTiled(0, q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, out,
                     lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      // TVM's batch_prefill_ragged_kv contract (the paged KV cache calls it)
      .def("kiln.attention.prefill_ragged", PrefillRaggedAuto)
      // The same with the tile height fixed (64 or 128 rows; 0 chooses): for tests and benchmarks
      .def("kiln.attention.prefill_ragged_tiled", PrefillRaggedTiled);
}

}  // namespace attention
}  // namespace kiln
