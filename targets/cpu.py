"""The CPU target: TVM's LLVM backend (x86_64 and aarch64 hosts)."""

from __future__ import annotations

from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.target import Target, codegen

from kiln.runtime.errors import KilnError
from kiln.targets.base import TargetSpec


def _make_target(arch: str | None) -> Target:
    # `arch` is an LLVM -mcpu name ("native" = this machine's); None means generic code for the
    # host's ISA, so the artifact runs on any machine of that ISA.
    config = {"kind": "llvm"}
    if arch == "native":
        arch = codegen.llvm_get_system_cpu()
    if arch:
        # TVM only logs an unknown -mcpu and falls back to generic code; refuse it instead.
        if not codegen.llvm_is_valid_cpu(arch, codegen.llvm_get_system_triple()):
            raise KilnError(
                f"--arch {arch!r} is not a CPU LLVM knows for this host (e.g. skylake, znver4, "
                "neoverse-n1, or native for this machine's)"
            )
        config["mcpu"] = arch
    return Target(config)


CPU = TargetSpec(
    name="cpu",
    device="cpu",
    description="the host CPU through LLVM (x86_64, aarch64)",
    default_arch=None,
    make_target=_make_target,
    library_dispatch=cpu_pipeline.library_dispatch_passes,
    legalize=cpu_pipeline.legalize_passes,
    dataflow_lower=cpu_pipeline.dataflow_lower_passes,
    finalize=cpu_pipeline.finalize_passes,
    dtypes=("float32", "float16", "bfloat16"),
    platforms=("linux-x86_64", "linux-aarch64", "macos-arm64"),
    fuse_swiglu=True,
)
