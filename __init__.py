"""Kiln: an ahead-of-time compiler for Llama-family LLMs on CUDA, ROCm, Metal and the CPU.

`kiln.compile(...)` turns a Hugging Face checkpoint into an artifact directory; `kiln.load(...)`
loads one with only the TVM runtime, and `kiln.Engine(...)` serves many requests from one with
continuous batching. All are imported lazily so that `import kiln` stays cheap and works on
devices that have no compiler.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "KilnError", "SamplingParams", "__version__", "compile", "load"]

from kiln.runtime.errors import KilnError


def compile(model: str, **kwargs: Any) -> Any:
    """Compile a checkpoint (directory or hub id); see `kiln.compiler.api.compile`."""
    from kiln.compiler.api import compile as _compile

    return _compile(model, **kwargs)


def load(path: str, device: str = "cpu", **kwargs: Any) -> Any:
    """Load a compiled artifact directory or a `.kiln` package; see `kiln.runtime.model.load`.

    A package is checked and extracted first and its TVM runtime put in place before TVM is
    imported (kiln.runtime.package); `device="auto"` picks its library for this machine.
    """
    from kiln.runtime import package

    if package.is_package(path):
        path, device = package.open_package(path, device, verify=kwargs.get("verify", True))
    from kiln.runtime.model import load as _load

    return _load(path, device=device, **kwargs)


def __getattr__(name: str) -> Any:
    # kiln.Engine and kiln.SamplingParams, imported on first use.
    if name == "Engine":
        from kiln.runtime.engine import Engine

        return Engine
    if name == "SamplingParams":
        from kiln.runtime.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
