// Kiln's cuBLAS extern: `kiln.cublas.matmul(x, w, out)` computes out = x @ w^T.
//
// The apache-tvm wheel has no cuBLAS contrib, so the fp16/bf16 GEMMs that Kiln's DispatchMatmul
// pass sends out of TVM (prefill and batched decode) land here. x is (..., k) row-major, w is a
// weight as Kiln's models store it, (n, k) row-major, and out is (..., n): every leading axis of
// x is one row of the GEMM. cuBLASLt runs it with fp32 accumulation on the tensor cores.
//
// cuBLASLt is not linked: `kiln.cublas.load(path)` opens the library that runtime/cublas/
// cublas.py found (CUDA 13's from pip, or CUDA 12's that torch brings) and resolves the dozen
// functions used here, whose C API and the by-value structs (cublasLtMatmulAlgo_t and the
// heuristic result) are the same in both; descriptors are made with the *Create functions, never
// laid out here. So one build of this file serves either cuBLAS.
//
// Each call runs on TVM's current stream for the device (TVMFFIEnvGetStream, which TVM's own
// kernels launch on), so it orders with them. Per thread and device: one cuBLASLt handle, one
// workspace allocated at the first call, and the plans (descriptors and the heuristic's choice)
// of every shape seen, so a call after the first costs the GEMM and a hash lookup.

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

namespace kiln {
namespace cublas {

using tvm::ffi::Tensor;

// 32 MiB: what NVIDIA recommends for cuBLASLt on Hopper (4 MiB is enough before it).
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

// The cuBLASLt functions used, resolved from the library `Load` opened.
struct Api {
  std::string path;
  size_t version = 0;
  decltype(&cublasLtGetVersion) GetVersion = nullptr;
  decltype(&cublasLtGetStatusString) StatusString = nullptr;
  decltype(&cublasLtCreate) Create = nullptr;
  decltype(&cublasLtDestroy) Destroy = nullptr;
  decltype(&cublasLtMatmulDescCreate) DescCreate = nullptr;
  decltype(&cublasLtMatmulDescDestroy) DescDestroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) DescSetAttribute = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) LayoutCreate = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) LayoutDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) PreferenceCreate = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) PreferenceDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) PreferenceSetAttribute = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) AlgoGetHeuristic = nullptr;
  decltype(&cublasLtMatmul) Matmul = nullptr;
};

Api* api = nullptr;  // set once by Load, never freed (the library stays open)
std::mutex load_mutex;

const Api& Loaded() {
  TVM_FFI_CHECK(api != nullptr, RuntimeError)
      << "kiln.cublas.matmul needs cuBLASLt, which is not loaded: call "
         "kiln.runtime.cublas.load_cublas() first";
  return *api;
}

void Check(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "cuBLAS: " << call << " failed: "
                                << Loaded().StatusString(status);
  }
}
#define KILN_CUBLAS_CALL(call) Check((call), #call)

void CheckCuda(cudaError_t result, const char* call) {
  if (result != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "CUDA: " << call << " failed: " << cudaGetErrorString(result);
  }
}
#define KILN_CUDA_CALL(call) CheckCuda((call), #call)

template <typename F>
void Resolve(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  TVM_FFI_CHECK(*fn != nullptr, RuntimeError)
      << "this cuBLASLt has no " << name << ": Kiln needs cuBLAS 12 or newer";
}

// Open cuBLASLt at `path` and return its version (e.g. 130100 for 13.1.0). Once per process: a
// second call with another path is refused, since the plans made with one library would not
// mean anything to another.
int64_t Load(const tvm::ffi::String& path) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (api != nullptr) {
    TVM_FFI_CHECK(api->path == std::string(path), RuntimeError)
        << "cuBLASLt is already loaded from " << api->path << ", not " << std::string(path);
    return static_cast<int64_t>(api->version);
  }
  // RTLD_LOCAL: the library's symbols stay out of the process's namespace, so a torch loaded
  // later (with its own cuBLAS of another version) binds to its own.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TVM_FFI_CHECK(lib != nullptr, RuntimeError) << "cannot load cuBLASLt: " << dlerror();
  Api* a = new Api();
  a->path = std::string(path);
  Resolve(lib, "cublasLtGetVersion", &a->GetVersion);
  Resolve(lib, "cublasLtGetStatusString", &a->StatusString);
  Resolve(lib, "cublasLtCreate", &a->Create);
  Resolve(lib, "cublasLtDestroy", &a->Destroy);
  Resolve(lib, "cublasLtMatmulDescCreate", &a->DescCreate);
  Resolve(lib, "cublasLtMatmulDescDestroy", &a->DescDestroy);
  Resolve(lib, "cublasLtMatmulDescSetAttribute", &a->DescSetAttribute);
  Resolve(lib, "cublasLtMatrixLayoutCreate", &a->LayoutCreate);
  Resolve(lib, "cublasLtMatrixLayoutDestroy", &a->LayoutDestroy);
  Resolve(lib, "cublasLtMatmulPreferenceCreate", &a->PreferenceCreate);
  Resolve(lib, "cublasLtMatmulPreferenceDestroy", &a->PreferenceDestroy);
  Resolve(lib, "cublasLtMatmulPreferenceSetAttribute", &a->PreferenceSetAttribute);
  Resolve(lib, "cublasLtMatmulAlgoGetHeuristic", &a->AlgoGetHeuristic);
  Resolve(lib, "cublasLtMatmul", &a->Matmul);
  a->version = a->GetVersion();
  TVM_FFI_CHECK(a->version >= 120000, RuntimeError)
      << "cuBLASLt at " << a->path << " is version " << a->version
      << "; Kiln needs cuBLAS 12 or newer";
  api = a;
  return static_cast<int64_t>(a->version);
}

cudaDataType_t AsCudaType(DLDataType t, bool allow_fp32) {
  if (t.lanes == 1 && t.bits == 16 && t.code == kDLFloat) return CUDA_R_16F;
  if (t.lanes == 1 && t.bits == 16 && t.code == kDLBfloat) return CUDA_R_16BF;
  if (allow_fp32 && t.lanes == 1 && t.bits == 32 && t.code == kDLFloat) return CUDA_R_32F;
  TVM_FFI_THROW(TypeError) << "kiln.cublas.matmul takes float16 or bfloat16 operands"
                           << (allow_fp32 ? " (and a float32 result)" : "") << ", got code="
                           << static_cast<int>(t.code) << " bits=" << static_cast<int>(t.bits)
                           << " lanes=" << static_cast<int>(t.lanes);
  return CUDA_R_16F;  // not reached
}

// The largest power of two (at most 256) dividing an address: cuBLASLt picks kernels that assume
// 256-byte aligned operands unless told otherwise.
uint32_t Alignment(const void* p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// One GEMM shape: out (m, n) = x (m, k) @ w (n, k)^T, all row-major.
struct Key {
  int64_t m, n, k;
  cudaDataType_t in, out;
  uint32_t align_x, align_w, align_out;

  bool operator<(const Key& o) const {
    return std::tie(m, n, k, in, out, align_x, align_w, align_out) <
           std::tie(o.m, o.n, o.k, o.in, o.out, o.align_x, o.align_w, o.align_out);
  }
};

// What cuBLASLt needs for one shape, made once. Column-major, cuBLAS's view of the same memory:
// out^T (n, m) = op(w) (n, k) @ x^T (k, m), where w's memory read column-major is (k, n) and so
// is transposed (TRANSA = T), and x's is (k, m) as it is: the "TN" GEMM.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  size_t workspace = 0;
};

// One per thread and device.
struct Context {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<Key, Plan> plans;

  ~Context() {
    // At thread exit; errors cannot be reported any more.
    for (auto& [key, p] : plans) {
      api->LayoutDestroy(p.a);
      api->LayoutDestroy(p.b);
      api->LayoutDestroy(p.c);
      api->DescDestroy(p.desc);
    }
    if (handle != nullptr) api->Destroy(handle);
    if (workspace != nullptr) cudaFree(workspace);
  }

  static Context* Get(int device) {
    thread_local std::unordered_map<int, Context> contexts;
    Context* ctx = &contexts[device];
    if (ctx->handle == nullptr) KILN_CUBLAS_CALL(api->Create(&ctx->handle));
    if (ctx->workspace == nullptr) KILN_CUDA_CALL(cudaMalloc(&ctx->workspace, kWorkspaceBytes));
    return ctx;
  }

  const Plan& PlanFor(const Key& key) {
    auto found = plans.find(key);
    if (found != plans.end()) return found->second;
    Plan p;
    KILN_CUBLAS_CALL(api->DescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
    KILN_CUBLAS_CALL(api->DescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa,
                                           sizeof(transa)));
    KILN_CUBLAS_CALL(api->DescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb,
                                           sizeof(transb)));
    KILN_CUBLAS_CALL(api->LayoutCreate(&p.a, key.in, key.k, key.n, key.k));
    KILN_CUBLAS_CALL(api->LayoutCreate(&p.b, key.in, key.k, key.m, key.k));
    KILN_CUBLAS_CALL(api->LayoutCreate(&p.c, key.out, key.n, key.m, key.n));

    cublasLtMatmulPreference_t pref;
    KILN_CUBLAS_CALL(api->PreferenceCreate(&pref));
    size_t max_workspace = kWorkspaceBytes;
    api->PreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                sizeof(max_workspace));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_out},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_out},
    };
    for (const auto& [attr, value] : aligns) {
      api->PreferenceSetAttribute(pref, attr, &value, sizeof(value));
    }
    cublasLtMatmulHeuristicResult_t result;
    int found_count = 0;
    cublasStatus_t status = api->AlgoGetHeuristic(handle, p.desc, p.a, p.b, p.c, p.c, pref, 1,
                                                  &result, &found_count);
    api->PreferenceDestroy(pref);
    if (status != CUBLAS_STATUS_SUCCESS || found_count == 0) {
      api->LayoutDestroy(p.a);
      api->LayoutDestroy(p.b);
      api->LayoutDestroy(p.c);
      api->DescDestroy(p.desc);
      TVM_FFI_THROW(RuntimeError) << "cuBLASLt has no algorithm for a (" << key.m << ", " << key.k
                                  << ") x (" << key.n << ", " << key.k << ")^T GEMM: "
                                  << api->StatusString(status);
    }
    p.algo = result.algo;
    p.workspace = result.workspaceSize;
    return plans.emplace(key, p).first->second;
  }
};

char* DataOf(const Tensor& t, const char* name, int device) {
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA && t.device().device_id == device, ValueError)
      << "kiln.cublas.matmul: " << name << " must be on cuda:" << device << ", it is on device "
      << t.device().device_type << ":" << t.device().device_id;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError)
      << "kiln.cublas.matmul: " << name << " must be contiguous";
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

void Matmul(Tensor x, Tensor w, Tensor out) {
  const Api& lt = Loaded();
  int device = x.device().device_id;
  TVM_FFI_CHECK(w.ndim() == 2 && x.ndim() >= 1 && out.ndim() == x.ndim(), ValueError)
      << "kiln.cublas.matmul takes x (..., k), w (n, k) and out (..., n); got ranks " << x.ndim()
      << ", " << w.ndim() << ", " << out.ndim();
  int64_t n = w.size(0), k = w.size(1);
  TVM_FFI_CHECK(x.size(-1) == k && out.size(-1) == n, ValueError)
      << "kiln.cublas.matmul: x (..., " << x.size(-1) << ") @ w (" << n << ", " << k
      << ")^T cannot make out (..., " << out.size(-1) << ")";
  int64_t m = 1;  // every leading axis of x is a row of the GEMM
  for (int i = 0; i + 1 < x.ndim(); ++i) {
    TVM_FFI_CHECK(x.size(i) == out.size(i), ValueError)
        << "kiln.cublas.matmul: x and out differ in axis " << i;
    m *= x.size(i);
  }
  cudaDataType_t in = AsCudaType(x.dtype(), false);
  TVM_FFI_CHECK(AsCudaType(w.dtype(), false) == in, TypeError)
      << "kiln.cublas.matmul: x and w must have the same dtype";
  cudaDataType_t out_type = AsCudaType(out.dtype(), true);
  char* x_data = DataOf(x, "x", device);
  char* w_data = DataOf(w, "w", device);
  char* out_data = DataOf(out, "out", device);
  if (m == 0 || n == 0) return;

  int current = -1;
  KILN_CUDA_CALL(cudaGetDevice(&current));
  if (current != device) KILN_CUDA_CALL(cudaSetDevice(device));
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  if (k == 0) {  // an empty sum, which cuBLASLt refuses
    KILN_CUDA_CALL(cudaMemsetAsync(out_data, 0, m * n * (out.dtype().bits / 8), stream));
    return;
  }
  Context* ctx = Context::Get(device);
  const Plan& p = ctx->PlanFor(
      Key{m, n, k, in, out_type, Alignment(x_data), Alignment(w_data), Alignment(out_data)});
  float alpha = 1.0f, beta = 0.0f;
  KILN_CUBLAS_CALL(lt.Matmul(ctx->handle, p.desc, &alpha, w_data, p.a, x_data, p.b, &beta,
                             out_data, p.c, out_data, p.c, &p.algo, ctx->workspace, p.workspace,
                             stream));
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("kiln.cublas.load", Load)
      .def("kiln.cublas.matmul", Matmul)
      // The loaded cuBLASLt's version (e.g. 130100), 0 before `load` (works without a GPU).
      .def("kiln.cublas.version",
           []() -> int64_t { return api == nullptr ? 0 : static_cast<int64_t>(api->version); });
}

}  // namespace cublas
}  // namespace kiln
