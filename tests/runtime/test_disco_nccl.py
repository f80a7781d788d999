"""Kiln's NCCL backend for TVM Disco (kiln.runtime.disco): it builds, links and registers its
functions on any machine with the CUDA headers and NCCL; on two GPUs, Disco's collectives run
on it and agree with NumPy."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from native_checks import run_without_compiler

from kiln.runtime.disco import nccl
from kiln.runtime.errors import KilnError

FUNCTIONS = {
    f"runtime.disco.nccl.{name}"
    for name in (
        "init_ccl init_ccl_per_worker allreduce allgather broadcast_from_worker0 "
        "scatter_from_worker0 gather_to_worker0 recv_from_worker0 send_to_next_group "
        "recv_from_prev_group send_to_worker recv_from_worker sync_worker version"
    ).split()
}


def _build_prerequisites() -> str | None:
    """Why the backend cannot be built here, or None."""
    try:
        nccl.tvm_include()
        nccl.native.cuda_include(nccl.WHAT)
        nccl.nccl_include()
        nccl.nccl_library()
    except KilnError as e:
        return str(e)
    return None


needs_build = pytest.mark.skipif(
    _build_prerequisites() is not None, reason=f"cannot build: {_build_prerequisites()}"
)


def _gpu_count() -> int:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@needs_build
def test_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    lib = nccl.build()
    assert lib.parent == tmp_path / "disco" and lib.is_file()
    built = lib.stat().st_mtime_ns
    assert nccl.build() == lib and lib.stat().st_mtime_ns == built  # cached, not rebuilt
    with open(lib, "rb") as f:
        assert f.read(4) == b"\x7fELF"


@needs_build
def test_loads_and_registers_without_gpu_or_compiler(tmp_path):
    """In a runtime-only TVM (no libtvm_compiler, no tvm.relax), as the GPU kit runs it: the
    backend registers every function, worker processes load it through Kiln's entry point, and
    they have left within 20 s of the session's last handle going (its shutdown)."""
    code = """
import json, os, sys, time
import tvm_ffi
from kiln.runtime.disco import load_nccl
disco = load_nccl()
names = sorted(n for n in tvm_ffi.registry.list_global_func_names() if ".nccl." in n)
sess = disco.ProcessSession(2, entrypoint="kiln.runtime.disco.worker")
remote = sess.get_global_func("runtime.disco.nccl.version")()
versions = [remote.debug_get_from_remote(i) for i in range(2)]

def workers():  # this process's live children running Kiln's worker entry point
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and b"disco.worker" in cmdline:
            found.append(int(pid))
    return found

running = workers()
del remote, sess  # the last handles: the session shuts down (an explicit shutdown() and then
# the destructor's would write to a worker that has left: TVM aborts on the broken pipe)
deadline = time.monotonic() + 20
while workers() and time.monotonic() < deadline:
    time.sleep(0.1)
print(json.dumps({
    "running": len(running),
    "left": workers(),
    "names": names,
    "version": tvm_ffi.get_global_func("runtime.disco.nccl.version")(),
    "workers": versions,
    "nvls": os.environ.get("NCCL_NVLS_ENABLE"),
    "relax": sorted(k for k in sys.modules if k.startswith(("tvm.relax", "kiln.compiler"))),
    "compiler_lib": "libtvm_compiler" in open("/proc/self/maps").read(),
}))
"""
    # Loading needs no compiler: the library comes from the cache.
    out = run_without_compiler(
        code, tmp_path, build_module="kiln.runtime.disco", unset=("NCCL_NVLS_ENABLE",)
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["names"]) == FUNCTIONS
    header = (nccl.nccl_include() / "nccl.h").read_text()
    major, minor, patch = (
        int(header.split(f"#define NCCL_{k} ")[1].split()[0]) for k in ("MAJOR", "MINOR", "PATCH")
    )
    assert result["version"] == major * 10000 + minor * 100 + patch
    assert result["workers"] == [result["version"]] * 2
    assert result["nvls"] == "0"
    assert result["relax"] == [] and not result["compiler_lib"]
    assert result["running"] == 1 and result["left"] == []


def test_missing_nccl_names_the_fix(monkeypatch):
    monkeypatch.setattr(nccl, "_nccl_homes", lambda: [])
    with pytest.raises(KilnError, match=r"nvidia-nccl-cu13"):
        nccl.nccl_library()
    with pytest.raises(KilnError, match=r"nccl\.h.*nvidia-nccl-cu13"):
        nccl.nccl_include()


@needs_build
def test_missing_compiler_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(KilnError, match=r"C\+\+ compiler: install g\+\+"):
        nccl.build(force=True)


def test_missing_tvm_headers_names_the_fix(tmp_path, monkeypatch):
    def no_headers():
        raise RuntimeError("Cannot find TVM include path.")

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(nccl.libinfo, "find_include_path", no_headers)
    with pytest.raises(KilnError, match=r"TVM's C\+\+ headers.*python -m kiln.runtime.disco"):
        nccl.build(force=True)


def test_session_arguments_are_checked():
    with pytest.raises(KilnError, match="distinct GPUs"):
        nccl.nccl_session([0, 0])
    with pytest.raises(KilnError, match="session kind"):
        nccl.nccl_session([0, 1], kind="socket")


# ---- on two GPUs ---------------------------------------------------------------------------

DTYPES = ["float16", "float32"]


@pytest.fixture(scope="module", params=["threaded", "process"])
def session(request):
    sess = nccl.nccl_session([0, 1], kind=request.param)
    yield sess
    sess.shutdown()


def _inputs(dtype: str, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    # Small integers: every sum is exact in float16, so results must equal NumPy's exactly.
    rng = np.random.default_rng(seed)
    return [rng.integers(-8, 8, shape).astype(dtype) for _ in range(2)]


def _on(sess, dref, worker: int) -> np.ndarray:
    sess._sync_all()  # every worker's NCCL stream
    return dref.debug_get_from_remote(worker).numpy()


def _per_worker(sess, xs: list[np.ndarray]):
    src = sess.empty(xs[0].shape, str(xs[0].dtype))
    for i, x in enumerate(xs):
        src.debug_copy_from(i, x)
    return src


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 NVIDIA GPUs")
class TestOnTwoGPUs:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("op", ["sum", "max"])
    def test_allreduce(self, session, dtype, op):
        xs = _inputs(dtype, (3, 257), seed=1)
        dst = session.empty((3, 257), dtype)
        session.allreduce(_per_worker(session, xs), dst, op)
        expected = xs[0] + xs[1] if op == "sum" else np.maximum(xs[0], xs[1])
        for i in range(2):
            np.testing.assert_array_equal(_on(session, dst, i), expected)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_allgather(self, session, dtype):
        xs = _inputs(dtype, (5, 33), seed=2)
        dst = session.empty((10, 33), dtype)
        session.allgather(_per_worker(session, xs), dst)
        for i in range(2):
            np.testing.assert_array_equal(_on(session, dst, i), np.concatenate(xs))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_broadcast_from_worker0(self, session, dtype):
        x = _inputs(dtype, (4, 1000), seed=3)[0]
        dst = session.broadcast(x)  # copy to worker 0, then broadcast_from_worker0
        for i in range(2):
            np.testing.assert_array_equal(_on(session, dst, i), x)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_scatter_from_worker0(self, session, dtype):
        x = np.stack(_inputs(dtype, (7, 129), seed=4))  # (workers, 7, 129)
        dst = session.scatter(x)  # copy to worker 0, then scatter_from_worker0
        for i in range(2):
            np.testing.assert_array_equal(_on(session, dst, i), x[i])

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_gather_to_worker0(self, session, dtype):
        xs = _inputs(dtype, (6, 65), seed=5)
        dst = session.empty((2, 6, 65), dtype, worker0_only=True)
        session.gather_to_worker0(_per_worker(session, xs), dst)
        np.testing.assert_array_equal(_on(session, dst, 0), np.stack(xs))
