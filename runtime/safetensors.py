"""A minimal safetensors reader (numpy memory maps), so devices need no extra package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from kiln.runtime.errors import KilnError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
try:  # bfloat16 arrays come from ml_dtypes, which TVM itself requires
    import ml_dtypes

    _DTYPES["BF16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only arrays mapped from disk."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise KilnError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return out
