// Kiln's prefill attention kernel (device code), shared by both entry points of flash_prefill.cu:
// a FlashAttention-2 style kernel on the tensor cores whose keys and values come either from
// the rows of a ragged batch (prefill_ragged) or from the pages of the paged KV cache
// (prefill_paged). What differs is only where key i of a sequence is (RaggedKeys, PagedKeys).
//
// Layout of the work: one thread block per (q head, q tile of kBlockM rows of one sequence),
// 4 or 8 warps, each warp 16 q rows. The block walks the sequence's keys in tiles of 64: K and V
// tiles go to shared memory with cp.async, one 16-byte piece of a key row at a time from that
// row's own address (so a tile may gather its rows from several pages); the next K tile loads
// while this one's softmax and P.V run, the next V tile while the next S = Q.K^T runs. S and O
// accumulate in fp32 registers from mma.sync m16n8k16 (fp16 or bf16 inputs), and the softmax is
// the online one. Under `causal`, key tiles past the tile's last row are never visited and only
// tiles that cross a row's limit are masked. Blocks take tiles heaviest first (the last rows of
// a causal sequence see the most keys) and find their sequence from q_indptr on the device, so a
// call never waits for the host.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kiln {
namespace attention {

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
  void* out;      // (total_q, h_q, d)
  float* lse;     // (total_q, h_q)
  const int32_t* q_indptr;  // (batch + 1)
  int batch, h_q, h_kv, group;  // group = h_q / h_kv
  int causal;
  float scale_log2;  // sm_scale * log2(e)
  // Ragged keys (RaggedKeys)
  const void* k;  // (total_kv, h_kv, d)
  const void* v;  // (total_kv, h_kv, d)
  const int32_t* kv_indptr;  // (batch + 1)
  // Paged keys (PagedKeys)
  const void* pages;             // (num_pages, 2, h_kv, page_size, d): K at [., 0], V at [., 1]
  const int32_t* page_indptr;    // (batch + 1)
  const int32_t* page_values;    // (nnz_pages): the pages of each sequence, in order
  const int32_t* last_page_len;  // (batch): keys in the sequence's last page
  int page_size;
};

// Where the keys (and values) of one sequence for one KV head are: `len` of them, key i's row
// (d elements) at Key(i), its value's at Value(i).
//
// A ragged batch: sequence b's keys are rows kv_indptr[b] .. kv_indptr[b + 1] of k and v.
template <typename T, int D>
struct RaggedKeys {
  const T* k;
  const T* v;
  int64_t stride;
  int len;
  __device__ RaggedKeys(const Params& p, int seq, int kv_head) {
    const int start = p.kv_indptr[seq];
    len = p.kv_indptr[seq + 1] - start;
    stride = int64_t{p.h_kv} * D;
    k = static_cast<const T*>(p.k) + (int64_t{start} * p.h_kv + kv_head) * D;
    v = static_cast<const T*>(p.v) + (int64_t{start} * p.h_kv + kv_head) * D;
  }
  __device__ __forceinline__ const T* Key(int i) const { return k + i * stride; }
  __device__ __forceinline__ const T* Value(int i) const { return v + i * stride; }
};

// The paged KV cache: sequence b has the pages page_values[page_indptr[b] .. page_indptr[b + 1]],
// all full but the last, which holds last_page_len[b] keys (no page: no key); its key i is row
// i % page_size of page page_values[page_indptr[b] + i / page_size].
template <typename T, int D>
struct PagedKeys {
  const T* k;            // the KV head's K rows in page 0
  const int32_t* pages;  // the sequence's pages
  int64_t page_elems;    // elements per page (K and V of every KV head)
  int64_t v_offset;      // from a key's K row to its V row
  int page_size;
  int len;
  __device__ PagedKeys(const Params& p, int seq, int kv_head) {
    const int first = p.page_indptr[seq];
    const int count = p.page_indptr[seq + 1] - first;
    page_size = p.page_size;
    len = count > 0 ? max((count - 1) * page_size + p.last_page_len[seq], 0) : 0;
    pages = p.page_values + first;
    v_offset = int64_t{p.h_kv} * page_size * D;
    page_elems = 2 * v_offset;
    k = static_cast<const T*>(p.pages) + int64_t{kv_head} * page_size * D;
  }
  __device__ __forceinline__ const T* Key(int i) const {
    return k + pages[i / page_size] * page_elems + (i % page_size) * D;
  }
  __device__ __forceinline__ const T* Value(int i) const { return Key(i) + v_offset; }
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

// Rows [0, kRows) of a tile, row r from row(r) (D elements), r < valid_rows, into shared memory
// with kStride elements per row; rows past valid_rows are zero (and row(r) is not called).
template <typename T, int D, int kRows, int kThreads, int kStride, typename RowAt>
__device__ __forceinline__ void LoadTile(T* dst, RowAt row, int valid_rows, const T* any_valid) {
  constexpr int kChunks = D / 8;  // 16-byte pieces of a row
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies as many pieces");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    bool valid = r < valid_rows;
    CopyAsync16(SharedAddress(dst + r * kStride + col), valid ? row(r) + col : any_valid, valid);
  }
}

// Keys: RaggedKeys<T, D> or PagedKeys<T, D>.
template <typename T, int D, int kWarps, typename Keys>
__global__ void __launch_bounds__(kWarps * 32) Prefill(const Params p) {
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
  const Keys kv(p, seq, kv_head);
  const int kv_len = kv.len;
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

  const int64_t q_stride = int64_t{p.h_q} * D;
  const T* q = static_cast<const T*>(p.q) + (int64_t{q_start + row0} * p.h_q + head) * D;
  const T* any_valid = static_cast<const T*>(p.q);
  auto key_tile = [&](T* dst, int key0) {  // keys key0 .. key0 + 63 into dst
    LoadTile<T, D, kBlockN, kThreads, kStride>(
        dst, [&](int r) { return kv.Key(key0 + r); }, kv_len - key0, any_valid);
  };

  LoadTile<T, D, kBlockM, kThreads, kStride>(
      q_s, [&](int r) { return q + r * q_stride; }, rows, any_valid);
  if (key_tiles > 0) key_tile(k_s, 0);
  CommitAsync();

  uint32_t q_frag[D / 16][4];     // the warp's 16 rows of Q as MMA A fragments
  float o[kTilesD][4];            // O (16 x D), fp32, unnormalized
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's part; the 4 threads of a row add up at the end
#pragma unroll
  for (int i = 0; i < kTilesD; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  for (int j = 0; j < key_tiles; ++j) {
    const int key0 = j * kBlockN;
    LoadTile<T, D, kBlockN, kThreads, kStride>(
        v_s, [&](int r) { return kv.Value(key0 + r); }, kv_len - key0, any_valid);
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
    if (j + 1 < key_tiles) key_tile(k_s, key0 + kBlockN);
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

}  // namespace attention
}  // namespace kiln
