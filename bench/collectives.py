"""All-reduce cost through Kiln's NCCL backend for TVM Disco, next to torch.distributed's NCCL.

For 2 and 4 GPUs and buffers of 8 KB ... 256 MB (in place, fp16 by default), it prints the time
of one all-reduce and its bus bandwidth (algorithm bandwidth x 2(n-1)/n, as nccl-tests reports
it) for three callers of the same NCCL:

- disco:  `runtime.disco.allreduce`, what a compiled sharded model calls (TVM's dispatcher, which
  looks up `runtime.disco.<ccl>.allreduce`, then Kiln's backend), on each Disco worker thread;
- direct: Kiln's `runtime.disco.nccl.allreduce` itself;
- torch:  `torch.distributed.all_reduce` (one process per GPU, Python per call).

Kiln's calls are issued back to back by a small compiled loop on each worker (no Python per
call), so disco - direct is TVM's dispatch and direct is NCCL plus Kiln's few checks.

    python bench/collectives.py [--gpus 2,4] [--dtype float16] [--json OUT.json] [--no-torch]
    python bench/collectives.py --build-only    # compile both libraries into $KILN_CACHE now
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import tvm_ffi

from kiln.runtime.disco import nccl
from kiln.runtime.package import cache_root

# kiln.bench.repeat(f, sync, n, args...) -> seconds per call of f(args...) made n times back to
# back on this worker, between two syncs. One untimed call and a sync come first: a collective
# completes on every worker at once, so the timed loops start together.
REPEAT_SOURCE = r"""
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <chrono>

TVM_FFI_STATIC_INIT_BLOCK() {
  tvm::ffi::reflection::GlobalDef().def_packed(
      "kiln.bench.repeat", [](tvm::ffi::PackedArgs args, tvm::ffi::Any* rv) {
        auto f = args[0].cast<tvm::ffi::Function>();
        auto sync = args[1].cast<tvm::ffi::Function>();
        int64_t n = args[2].cast<int64_t>();
        tvm::ffi::PackedArgs call = args.Slice(3);
        tvm::ffi::Any ignored;
        f.CallPacked(call, &ignored);
        sync();
        auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < n; ++i) f.CallPacked(call, &ignored);
        sync();
        std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
        *rv = took.count() / static_cast<double>(n);
      });
}
"""


def repeat_library() -> Path:
    """The compiled loop, built once into $KILN_CACHE/bench (it needs only tvm_ffi)."""
    key = hashlib.sha256(REPEAT_SOURCE.encode() + tvm_ffi.__version__.encode()).hexdigest()[:16]
    out = cache_root() / "bench" / f"repeat-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".cc")
    src.write_text(REPEAT_SOURCE)
    ffi_lib = Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", str(src), "-o", str(out),
         f"-I{tvm_ffi.libinfo.find_include_path()}", f"-L{ffi_lib}", "-ltvm_ffi"],
        check=True,
    )  # fmt: skip
    return out


def sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def iterations(nbytes: int) -> int:
    return max(10, min(500, int(4e8 / nbytes)))


def bus_bw(nbytes: int, seconds: float, gpus: int) -> float:
    """GB/s moved per GPU link by a ring all-reduce (nccl-tests' busbw)."""
    return nbytes / seconds * 2 * (gpus - 1) / gpus / 1e9


def kiln_times(gpus: int, dtype: str, byte_sizes: list[int]) -> dict[str, list[float]]:
    """Seconds per all-reduce for each size, through Disco's dispatcher and directly."""
    from tvm_ffi import Shape

    ctypes.CDLL(str(repeat_library()), mode=os.RTLD_GLOBAL)
    sess = nccl.nccl_session(list(range(gpus)), kind="threaded")
    repeat = sess.get_global_func("kiln.bench.repeat")
    sync = sess.get_global_func("runtime.disco.nccl.sync_worker")
    callers = {
        "disco": (sess.get_global_func("runtime.disco.allreduce"), Shape([0])),  # sum
        "direct": (sess.get_global_func("runtime.disco.nccl.allreduce"), 0),
    }
    itemsize = np.dtype(dtype).itemsize
    out: dict[str, list[float]] = {name: [] for name in callers}
    for nbytes in byte_sizes:
        buf = sess.empty((nbytes // itemsize,), dtype)
        for name, (fn, kind) in callers.items():
            per_worker = repeat(fn, sync, iterations(nbytes), buf, kind, True, buf)
            sess._sync_all()
            out[name].append(max(per_worker.debug_get_from_remote(w) for w in range(gpus)))
        del buf
    sess.shutdown()
    return out


def _torch_worker(rank: int, gpus: int, port: int, dtype: str, byte_sizes, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=gpus
    )
    tdtype = getattr(torch, dtype)
    times = []
    for nbytes in byte_sizes:
        buf = torch.zeros(nbytes // (torch.finfo(tdtype).bits // 8), dtype=tdtype, device="cuda")
        n = iterations(nbytes)
        dist.all_reduce(buf)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        took = torch.tensor([(time.perf_counter() - start) / n], device="cuda")
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times.append(took.item())
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def torch_times(gpus: int, dtype: str, byte_sizes: list[int]) -> list[float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _torch_worker, args=(gpus, port, dtype, byte_sizes, queue), nprocs=gpus,
        start_method="spawn",
    )  # fmt: skip
    return queue.get()


def human(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def gpu_count() -> int:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    ok = cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
    return count.value if ok else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="2,4", help="comma-separated GPU counts")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    ap.add_argument("--min-size", type=int, default=8 << 10, help="bytes")
    ap.add_argument("--max-size", type=int, default=256 << 20, help="bytes")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    if args.build_only:
        print(nccl.build())
        print(repeat_library())
        return

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # torch's workers inherit it too
    byte_sizes = sizes(args.min_size, args.max_size)
    available = gpu_count()
    results = {}
    for gpus in (int(g) for g in args.gpus.split(",")):
        if gpus > available:
            print(f"skipping {gpus} GPUs: this machine has {available}")
            continue
        kiln = kiln_times(gpus, args.dtype, byte_sizes)
        ref = None if args.no_torch else torch_times(gpus, args.dtype, byte_sizes)
        rows = []
        print(f"\nall-reduce (sum, in place, {args.dtype}) on {gpus} GPUs")
        print(f"{'size':>8} | {'disco us':>9} {'busbw':>7} | {'direct us':>9} {'busbw':>7} | "
              f"{'torch us':>9} {'busbw':>7} | {'disco-torch us':>14}")  # fmt: skip
        for i, nbytes in enumerate(byte_sizes):
            d, k = kiln["disco"][i], kiln["direct"][i]
            t = ref[i] if ref else float("nan")
            rows.append({"bytes": nbytes, "disco_s": d, "direct_s": k, "torch_s": t})
            print(
                f"{human(nbytes):>8} | {d * 1e6:9.1f} {bus_bw(nbytes, d, gpus):7.1f} | "
                f"{k * 1e6:9.1f} {bus_bw(nbytes, k, gpus):7.1f} | "
                f"{t * 1e6:9.1f} {bus_bw(nbytes, t, gpus):7.1f} | {(d - t) * 1e6:14.1f}"
            )
        results[gpus] = rows
    print("\nbusbw in GB/s (nccl-tests' definition); us per all-reduce, max over GPUs")
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "results": results}, indent=1))


if __name__ == "__main__":
    main()
