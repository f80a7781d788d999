// Host-side helpers of Kiln's CUDA extern libraries (runtime/attention, runtime/gemv): CUDA errors
// as TVM errors, a tensor's data, TVM's stream, the SM count, the shared-memory opt-in. Each
// library includes this header, so each carries its own copy (no library links another); it is
// among each library's sources (SOURCES), so a change here rebuilds both.

#pragma once

#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <atomic>
#include <cstdint>

namespace kiln {

inline void CheckCuda(cudaError_t result, const char* name, const char* what) {
  if (result != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << name << ": " << what
                                << " failed: " << cudaGetErrorString(result);
  }
}

inline char* DataOf(const tvm::ffi::Tensor& t) {
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// TVM's current stream for `device`, made the current device.
inline cudaStream_t TvmStream(const char* name, int device) {
  int current = -1;
  CheckCuda(cudaGetDevice(&current), name, "cudaGetDevice");
  if (current != device) CheckCuda(cudaSetDevice(device), name, "cudaSetDevice");
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
}

inline int SmCount(const char* name, int device) {
  static std::atomic<int> counts[64];
  int n = counts[device % 64].load();
  if (n == 0) {
    CheckCuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), name,
              "cudaDeviceGetAttribute");
    counts[device % 64].store(n);
  }
  return n;
}

// Past 48 KiB of dynamic shared memory a kernel must opt in, once per device: lets `kernel` take
// `bytes`. `opted_in`, one per kernel (a static of its launcher), remembers the devices done.
template <typename Kernel>
void OptInSharedMemory(Kernel kernel, size_t bytes, int device, std::atomic<uint64_t>& opted_in,
                       const char* name) {
  const uint64_t bit = uint64_t{1} << (device % 64);
  if (opted_in.load() & bit) return;
  CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(bytes)),
            name, "cudaFuncSetAttribute");
  opted_in.fetch_or(bit);
}

}  // namespace kiln
