// Kiln's NCCL backend for TVM Disco.
//
// The apache-tvm wheel has Disco (sessions, workers, `runtime.disco.allreduce` ...) but was built
// without NCCL: each collective there looks up `runtime.disco.<worker->ccl>.<name>` and finds
// nothing. Loading this library registers those functions for ccl "nccl", so that
// `Session.init_ccl("nccl", ...)`, the session's collectives and a compiled model's
// `R.ccl.allreduce` calls run on NCCL. runtime/disco/nccl.py builds and loads it.
//
// Everything on the hot path is compiled: one registry lookup in TVM's dispatcher, then here a
// thread-local context, a dtype switch and the NCCL call. Collectives run on TVM's current CUDA
// stream or, while that is the legacy default stream (TVM's default), on a blocking stream of
// their own, which orders itself with the default stream both ways (as in TVM's own NCCL
// backend). Not on the default stream itself: NCCL has had bugs there. Not on a stream from
// TVM's DeviceAPI::CreateStream: those are non-blocking and would race with TVM's kernels.

#include <cuda_runtime_api.h>
#include <dlpack/dlpack.h>
#include <nccl.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace kiln {
namespace disco_nccl {

using tvm::ffi::Optional;
using tvm::ffi::Shape;
using tvm::ffi::Tensor;
using tvm::runtime::DeviceAPI;
using tvm::runtime::DiscoWorker;

void Check(ncclResult_t result, const char* call) {
  if (result != ncclSuccess) {
    TVM_FFI_THROW(RuntimeError) << "NCCL: " << call << " failed: " << ncclGetErrorString(result)
                                << " " << ncclGetLastError(nullptr);
  }
}
#define KILN_NCCL_CALL(call) Check((call), #call)

ncclDataType_t AsNcclType(DLDataType t) {
  if (t.lanes == 1) {
    switch (t.code) {
      case kDLInt:
        if (t.bits == 8) return ncclInt8;
        if (t.bits == 32) return ncclInt32;
        if (t.bits == 64) return ncclInt64;
        break;
      case kDLUInt:
      case kDLBool:
        if (t.bits == 8) return ncclUint8;
        if (t.bits == 32) return ncclUint32;
        if (t.bits == 64) return ncclUint64;
        break;
      case kDLFloat:
        if (t.bits == 16) return ncclFloat16;
        if (t.bits == 32) return ncclFloat32;
        if (t.bits == 64) return ncclFloat64;
        break;
      case kDLBfloat:
        if (t.bits == 16) return ncclBfloat16;
        break;
      case kDLFloat8_e4m3fn:
      case kDLFloat8_e5m2:
        // Moved as bytes; AllReduce refuses them (a byte sum is not an fp8 sum).
        return ncclUint8;
      default:
        break;
    }
  }
  TVM_FFI_THROW(TypeError) << "NCCL cannot move dtype code=" << static_cast<int>(t.code)
                           << " bits=" << static_cast<int>(t.bits)
                           << " lanes=" << static_cast<int>(t.lanes);
  return ncclUint8;  // not reached
}

void CheckCuda(cudaError_t result, const char* call) {
  if (result != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "CUDA: " << call << " failed: " << cudaGetErrorString(result);
  }
}
#define KILN_CUDA_CALL(call) CheckCuda((call), #call)

ncclRedOp_t AsNcclOp(int kind) {
  // tvm::runtime::ReduceKind: sum, prod, min, max, avg
  static constexpr ncclRedOp_t kOps[] = {ncclSum, ncclProd, ncclMin, ncclMax, ncclAvg};
  TVM_FFI_CHECK(0 <= kind && kind <= 4, ValueError) << "unknown reduce kind " << kind;
  return kOps[kind];
}

void* DataOf(const Tensor& t) {
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA, ValueError)
      << "NCCL collectives need CUDA tensors, got device type " << t.device().device_type;
  TVM_FFI_CHECK(t.IsContiguous(), ValueError) << "NCCL collectives need contiguous tensors";
  return static_cast<char*>(t.data_ptr()) + t.byte_offset();
}

// One per worker thread: Disco runs each worker's instructions on one thread, in order.
struct Context {
  DiscoWorker* worker = nullptr;
  DLDevice device{kDLCUDA, 0};
  DeviceAPI* api = nullptr;          // TVM's, for its current stream
  cudaStream_t own_stream = nullptr;  // used while TVM's current stream is the default one
  ncclComm_t global_comm = nullptr;
  ncclComm_t group_comm = nullptr;  // the same as global_comm with one group

  static Context* Get() {
    thread_local Context ctx;
    return &ctx;
  }

  Context* Checked() {
    TVM_FFI_CHECK(worker != nullptr, RuntimeError)
        << "NCCL is not initialized on this worker: call Session.init_ccl(\"nccl\", ...) first";
    return this;
  }

  cudaStream_t Stream() {
    void* s = api->GetCurrentStream(device);
    return s != nullptr ? static_cast<cudaStream_t>(s) : own_stream;
  }

  ncclComm_t Comm(bool in_group) const { return in_group ? group_comm : global_comm; }

  int GroupSize() const { return worker->num_workers / worker->num_groups; }

  // Worker 0 of the whole session, or of this worker's group.
  bool IsRoot(bool in_group) const {
    return in_group ? worker->worker_id % GroupSize() == 0 : worker->worker_id == 0;
  }

  ~Context() {
    // At thread exit; errors cannot be reported any more, and a throw here would terminate.
    if (group_comm != nullptr && group_comm != global_comm) ncclCommDestroy(group_comm);
    if (global_comm != nullptr) ncclCommDestroy(global_comm);
    if (own_stream != nullptr) cudaStreamDestroy(own_stream);
  }
};

// On the controller: make a unique id and send it to every worker.
void InitCCL(tvm::runtime::Session sess, Shape device_ids) {
  // NVLink SHARP (multicast) reserves fabric resources for the whole machine: off unless asked
  // for. Set here, before any worker thread reads the environment; worker processes inherit it
  // from kiln.runtime.disco, which sets it before it starts them.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  ncclUniqueId id;
  KILN_NCCL_CALL(ncclGetUniqueId(&id));
  tvm::runtime::DRef init = sess->GetGlobalFunc("runtime.disco.nccl.init_ccl_per_worker");
  sess->CallPacked(init, device_ids, tvm::ffi::Bytes(id.internal, NCCL_UNIQUE_ID_BYTES));
}

void InitCCLPerWorker(Shape device_ids, tvm::ffi::Bytes unique_id) {
  Context* ctx = Context::Get();
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_CHECK(ctx->worker == nullptr, RuntimeError) << "NCCL is already initialized here";
  TVM_FFI_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, ValueError)
      << "an NCCL unique id has " << NCCL_UNIQUE_ID_BYTES << " bytes, got " << unique_id.size();
  // One device per worker of this node (a socket session's nodes each number theirs from 0).
  TVM_FFI_CHECK(worker->local_worker_id < static_cast<int>(device_ids.size()), ValueError)
      << "init_ccl got " << device_ids.size() << " device ids for worker "
      << worker->local_worker_id;
  ctx->device = DLDevice{kDLCUDA, static_cast<int32_t>(device_ids[worker->local_worker_id])};
  ctx->api = DeviceAPI::Get(ctx->device);
  KILN_CUDA_CALL(cudaSetDevice(ctx->device.device_id));
  if (worker->default_device.device_type == kDLCPU) {
    worker->default_device = ctx->device;
  } else {
    TVM_FFI_CHECK(worker->default_device.device_type == kDLCUDA &&
                      worker->default_device.device_id == ctx->device.device_id,
                  ValueError)
        << "worker " << worker->worker_id << " already uses another device than cuda:"
        << ctx->device.device_id;
  }
  KILN_CUDA_CALL(cudaStreamCreate(&ctx->own_stream));  // blocking: see the top of this file

  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  KILN_NCCL_CALL(ncclCommInitRank(&ctx->global_comm, worker->num_workers, id, worker->worker_id));
  if (worker->num_groups == 1) {
    ctx->group_comm = ctx->global_comm;
  } else {
    int group_size = worker->num_workers / worker->num_groups;
    KILN_NCCL_CALL(ncclCommSplit(ctx->global_comm, worker->worker_id / group_size,
                                 worker->worker_id % group_size, &ctx->group_comm, nullptr));
  }
  ctx->worker = worker;
  worker->ccl = "nccl";
}

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  Context* ctx = Context::Get()->Checked();
  DLDataType t = send.dtype();
  TVM_FFI_CHECK(t.code != kDLFloat8_e4m3fn && t.code != kDLFloat8_e5m2, TypeError)
      << "NCCL cannot all-reduce float8 tensors";
  TVM_FFI_CHECK(send.numel() == recv.numel(), ValueError)
      << "allreduce: send has " << send.numel() << " elements, recv " << recv.numel();
  KILN_NCCL_CALL(ncclAllReduce(DataOf(send), DataOf(recv), send.numel(), AsNcclType(t),
                               AsNcclOp(kind), ctx->Comm(in_group), ctx->Stream()));
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  Context* ctx = Context::Get()->Checked();
  int ranks = in_group ? ctx->GroupSize() : ctx->worker->num_workers;
  TVM_FFI_CHECK(send.numel() * ranks == recv.numel(), ValueError)
      << "allgather: recv must hold " << ranks << " x " << send.numel() << " elements, has "
      << recv.numel();
  KILN_NCCL_CALL(ncclAllGather(DataOf(send), DataOf(recv), send.numel(), AsNcclType(send.dtype()),
                               ctx->Comm(in_group), ctx->Stream()));
}

void BroadcastFromWorker0(Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Context::Get()->Checked();
  const void* src = nullptr;
  if (ctx->IsRoot(in_group)) {
    TVM_FFI_CHECK(send.has_value(), ValueError) << "broadcast: worker 0 needs a send buffer";
    TVM_FFI_CHECK(send.value().numel() == recv.numel(), ValueError)
        << "broadcast: send has " << send.value().numel() << " elements, recv " << recv.numel();
    src = DataOf(send.value());
  }
  KILN_NCCL_CALL(ncclBroadcast(src, DataOf(recv), recv.numel(), AsNcclType(recv.dtype()), 0,
                               ctx->Comm(in_group), ctx->Stream()));
}

// Worker 0 splits `whole` into equal parts along memory and exchanges part i with worker i;
// `scatter` sends the parts out, otherwise (gather) it receives them.
void RootExchange(Context* ctx, bool in_group, bool scatter, Optional<Tensor> whole,
                  const Tensor& part) {
  const char* what = scatter ? "scatter" : "gather";
  bool root = ctx->IsRoot(in_group);
  int ranks = in_group ? ctx->GroupSize() : ctx->worker->num_workers;
  // Check everything before the group opens: a throw inside it would leave the group open.
  char* whole_data = nullptr;
  if (root) {
    TVM_FFI_CHECK(whole.has_value(), ValueError) << what << ": worker 0 needs the whole buffer";
    TVM_FFI_CHECK(whole.value().numel() == part.numel() * ranks, ValueError)
        << what << ": the whole buffer must hold " << ranks << " x " << part.numel()
        << " elements, has " << whole.value().numel();
    whole_data = static_cast<char*>(DataOf(whole.value()));
  }
  void* part_data = DataOf(part);
  size_t part_bytes = tvm::ffi::GetDataSize(part.numel(), part.dtype());
  ncclDataType_t type = AsNcclType(part.dtype());
  ncclComm_t comm = ctx->Comm(in_group);
  cudaStream_t stream = ctx->Stream();

  KILN_NCCL_CALL(ncclGroupStart());
  for (int i = 0; root && i < ranks; ++i) {
    char* data = whole_data + i * part_bytes;
    if (scatter) {
      KILN_NCCL_CALL(ncclSend(data, part.numel(), type, i, comm, stream));
    } else {
      KILN_NCCL_CALL(ncclRecv(data, part.numel(), type, i, comm, stream));
    }
  }
  if (scatter) {
    KILN_NCCL_CALL(ncclRecv(part_data, part.numel(), type, 0, comm, stream));
  } else {
    KILN_NCCL_CALL(ncclSend(part_data, part.numel(), type, 0, comm, stream));
  }
  KILN_NCCL_CALL(ncclGroupEnd());
}

// Point to point over the global communicator (worker ids are global ones).
void SendRecv(const Tensor& buffer, int peer, bool send) {
  Context* ctx = Context::Get()->Checked();
  TVM_FFI_CHECK(0 <= peer && peer < ctx->worker->num_workers, ValueError)
      << "no worker " << peer << " among " << ctx->worker->num_workers;
  TVM_FFI_CHECK(peer != ctx->worker->worker_id, ValueError)
      << "worker " << peer << " cannot " << (send ? "send to" : "receive from") << " itself";
  void* data = DataOf(buffer);
  ncclDataType_t type = AsNcclType(buffer.dtype());
  KILN_NCCL_CALL(ncclGroupStart());
  if (send) {
    KILN_NCCL_CALL(ncclSend(data, buffer.numel(), type, peer, ctx->global_comm, ctx->Stream()));
  } else {
    KILN_NCCL_CALL(ncclRecv(data, buffer.numel(), type, peer, ctx->global_comm, ctx->Stream()));
  }
  KILN_NCCL_CALL(ncclGroupEnd());
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.nccl.init_ccl", InitCCL)
      .def("runtime.disco.nccl.init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco.nccl.allreduce", AllReduce)
      .def("runtime.disco.nccl.allgather", AllGather)
      .def("runtime.disco.nccl.broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco.nccl.scatter_from_worker0",
           [](Optional<Tensor> send, bool in_group, Tensor recv) {
             RootExchange(Context::Get()->Checked(), in_group, /*scatter=*/true, send, recv);
           })
      .def("runtime.disco.nccl.gather_to_worker0",
           [](Tensor send, bool in_group, Optional<Tensor> recv) {
             RootExchange(Context::Get()->Checked(), in_group, /*scatter=*/false, recv, send);
           })
      .def("runtime.disco.nccl.recv_from_worker0",
           [](Tensor buffer) { SendRecv(buffer, 0, /*send=*/false); })
      .def("runtime.disco.nccl.send_to_next_group",
           [](Tensor buffer) {
             Context* ctx = Context::Get()->Checked();
             SendRecv(buffer, ctx->worker->worker_id + ctx->GroupSize(), /*send=*/true);
           })
      .def("runtime.disco.nccl.recv_from_prev_group",
           [](Tensor buffer) {
             Context* ctx = Context::Get()->Checked();
             SendRecv(buffer, ctx->worker->worker_id - ctx->GroupSize(), /*send=*/false);
           })
      .def("runtime.disco.nccl.send_to_worker",
           [](Tensor buffer, int receiver) { SendRecv(buffer, receiver, /*send=*/true); })
      .def("runtime.disco.nccl.recv_from_worker",
           [](Tensor buffer, int sender) { SendRecv(buffer, sender, /*send=*/false); })
      .def("runtime.disco.nccl.sync_worker",
           []() {
             KILN_CUDA_CALL(cudaStreamSynchronize(Context::Get()->Checked()->Stream()));
           })
      // The NCCL library actually loaded, e.g. 23203 for 2.32.3 (works without a GPU).
      .def("runtime.disco.nccl.version", []() -> int64_t {
        int version = 0;
        KILN_NCCL_CALL(ncclGetVersion(&version));
        return version;
      });
}

}  // namespace disco_nccl
}  // namespace kiln
