"""The CPU target's float16 on x86-64: generic code (no --arch) converts each fp16 value through a
compiler-rt call, which `kiln compile` warns of; with an --arch that has F16C (x86-64-v3) the
library converts with vcvtph2ps / vcvtps2ph instead, and nothing is said. float32 is not
affected, nor warned of."""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest

import kiln
from kiln.compiler.api import KilnWarning
from kiln.runtime.host import host_platform

pytestmark = pytest.mark.skipif(host_platform() != "linux-x86_64", reason="x86-64 code")


def conversions(library: Path) -> tuple[int, int]:
    """(calls of compiler-rt's fp16 conversions, F16C conversion instructions) in `library`."""
    text = subprocess.run(
        ["objdump", "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    calls = len(re.findall(r"call.*<__(extendhfsf2|truncsfhf2)", text))
    return calls, len(re.findall(r"vcvt(ph2ps|ps2ph)", text))


@pytest.mark.parametrize(
    "preset,arch,generic",
    [("q0f16", None, True), ("q0f16", "x86-64-v3", False), ("q0f32", None, False)],
)
def test_generic_x86_float16_is_warned_of_and_f16c_avoids_its_calls(
    preset, arch, generic, checkpoint, tmp_path
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kiln.compile(
            str(checkpoint("llama")), quantization=preset, output=tmp_path / "a",
            **({"arch": arch} if arch else {}),
        )  # fmt: skip
    named = [w for w in caught if w.category is KilnWarning and "--arch native" in str(w.message)]
    assert len(named) == (1 if generic else 0)
    calls, f16c = conversions(Path(out) / "model-cpu.so")
    if preset == "q0f16":
        assert (calls > 0, f16c > 0) == (generic, not generic)
    else:
        assert (calls, f16c) == (0, 0)
