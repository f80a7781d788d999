"""Kiln: an ahead-of-time compiler for Llama-family LLMs on CUDA, ROCm, Metal and the CPU.

`kiln.compile(...)` turns a Hugging Face checkpoint into an artifact directory; `kiln.load(...)`
loads one with only the TVM runtime. Both are imported lazily so that `import kiln` stays cheap
and works on devices that have no compiler.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["KilnError", "__version__", "compile", "load"]

from kiln.runtime.errors import KilnError


def compile(model: str, **kwargs: Any) -> Any:
    """Compile a checkpoint (directory or hub id); see `kiln.compiler.api.compile`."""
    from kiln.compiler.api import compile as _compile

    return _compile(model, **kwargs)


def load(path: str, device: str = "cpu", **kwargs: Any) -> Any:
    """Load a compiled artifact; see `kiln.runtime.model.load`."""
    from kiln.runtime.model import load as _load

    return _load(path, device=device, **kwargs)
