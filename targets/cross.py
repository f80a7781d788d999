"""Cross-compiling the host side: `kiln compile --platform linux-aarch64 | macos-arm64 | ...`.

A library's host code (the Relax VM's functions, kernel launchers, CPU kernels) is LLVM code for
one OS and CPU. TVM emits objects for any LLVM triple; what a build machine lacks is a linker for
the other platforms. The `ziglang` wheel (a Kiln dependency) carries clang's drivers and linkers
for all of them, with glibc stubs for Linux, so no cross toolchain or SDK has to be installed.
Linux libraries link against glibc 2.28, the oldest the apache-tvm wheels (manylinux_2_28) run on.
The TVM runtime's symbols stay undefined and bind when the runtime loads the library, as with
TVM's own native builds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tvm.target import Target, codegen

from kiln.runtime.errors import KilnError
from kiln.runtime.host import PLATFORMS, host_platform

# platform -> (LLVM triple, zig target)
TRIPLES = {
    "linux-x86_64": ("x86_64-linux-gnu", "x86_64-linux-gnu.2.28"),
    "linux-aarch64": ("aarch64-linux-gnu", "aarch64-linux-gnu.2.28"),
    "macos-arm64": ("arm64-apple-macos", "aarch64-macos.11.0"),
}


def check_platform(platform: str | None, supported: tuple[str, ...], target: str) -> str:
    """The platform a build is for (None: this machine's, or the target's only one, e.g. the
    Mac for Metal); refuses one the target cannot run on."""
    host = host_platform()
    platform = platform or (host if host in supported else supported[0])
    if platform not in PLATFORMS:
        raise KilnError(
            f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}"
        )
    if platform not in supported:
        raise KilnError(
            f"--target {target} does not run on {platform}: it runs on {', '.join(supported)}"
        )
    return platform


def build_target(spec: Any, arch: str | None, platform: str) -> Target:
    """The TVM target of one build of `spec` whose host code runs on `platform`."""
    if platform == host_platform():
        return spec.target(arch)
    if spec.device == "cpu":  # `arch` is a CPU of the other platform, not of this machine
        if arch == "native":
            raise KilnError(
                f"--arch native means this machine's CPU; name a CPU of {platform} instead "
                "(or leave --arch out for generic code)"
            )
        config = {"kind": "llvm", "mtriple": TRIPLES[platform][0]}
        if arch:
            _check_cpu(arch, config["mtriple"])
            config["mcpu"] = arch
        return Target(config)
    return cross_target(spec.target(arch), platform)


def cross_target(target: Target, platform: str) -> Target:
    """`target` with its host code for `platform` (a CPU target is its own host)."""
    triple = TRIPLES[platform][0]
    config = dict(target.export())
    host = config.pop("host", None)
    if host is None:  # an llvm target
        config["mtriple"] = triple
        _check_cpu(config.get("mcpu"), triple)
        return Target(config)
    if host.get("mtriple") != triple:  # Metal's host is already the Mac's (with its mcpu)
        host = {"kind": "llvm", "mtriple": triple}
    return Target(config, host=host)


def _check_cpu(cpu: str | None, triple: str) -> None:
    if cpu and not codegen.llvm_is_valid_cpu(cpu, triple):
        raise KilnError(
            f"--arch {cpu!r} is not a CPU LLVM knows for {triple} (e.g. neoverse-n1, cortex-a78 "
            "for aarch64; skylake, znver4 for x86_64)"
        )


def zig() -> str:
    try:
        import ziglang
    except ImportError:
        raise KilnError(
            "cross-compiling needs the ziglang wheel as a linker: `pip install ziglang` "
            "(a Kiln dependency)"
        ) from None
    return str(Path(ziglang.__file__).parent / "zig")


def linker(platform: str) -> Any:
    """TVM's `fcompile` hook linking host objects into a shared library for `platform`."""
    triple, zig_target = TRIPLES[platform]

    def link(output: str, objects: list[str], **_options: Any) -> None:
        flags = ["-shared", "-fPIC"]
        if platform.startswith("macos"):
            name = Path(output).name
            flags = ["-shared", "-undefined", "dynamic_lookup", f"-Wl,-install_name,@rpath/{name}"]
        done = subprocess.run(
            [zig(), "cc", "-target", zig_target, *flags, "-o", output, *objects],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KilnError(f"zig could not link the {platform} library: {done.stderr.strip()}")

    link.get_target_triple = lambda: triple  # type: ignore[attr-defined]
    return link

