"""Reading and rewriting the module blob that `export_library` embeds in a host library.

A compiled library carries its device modules serialized in one byte array,
`__tvm_ffi__library_bin`: an import tree, then each module as its type key followed by its own
bytes ("_lib" stands for the host library itself and has none). GPU targets use this to replace
what TVM's codegen left there (e.g. CUDA C++ source, compiled at load) by finished machine code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_U64 = struct.Struct("<Q")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("library blob is truncated")
        self.pos += n
        return out

    def bytes_(self) -> bytes:
        return self.raw(self.u64())


def _u64s(values: list[int]) -> bytes:
    return _U64.pack(len(values)) + b"".join(_U64.pack(v) for v in values)


def _bytes(value: bytes) -> bytes:
    return _U64.pack(len(value)) + value


@dataclass
class Blob:
    row_ptr: list[int]
    child_indices: list[int]
    modules: list[tuple[str, bytes | None]]  # (type key, payload); None for "_lib"

    @classmethod
    def parse(cls, data: bytes) -> Blob:
        r = _Reader(data)
        total = r.u64()
        if total != len(data) - 8:
            raise ValueError("library blob length does not match its header")
        row_ptr = [r.u64() for _ in range(r.u64())]
        child_indices = [r.u64() for _ in range(r.u64())]
        modules: list[tuple[str, bytes | None]] = []
        while r.pos < len(data):
            key = r.bytes_().decode()
            modules.append((key, None if key == "_lib" else r.bytes_()))
        return cls(row_ptr, child_indices, modules)

    def serialize(self) -> bytes:
        body = _u64s(self.row_ptr) + _u64s(self.child_indices)
        for key, payload in self.modules:
            body += _bytes(key.encode())
            if payload is not None:
                body += _bytes(payload)
        return _U64.pack(len(body)) + body

    def rewrite(self, kind: str, fn: Callable[[bytes], bytes]) -> int:
        """Replace the payload of every module of `kind`; returns how many there were."""
        count = 0
        for i, (key, payload) in enumerate(self.modules):
            if key == kind and payload is not None:
                self.modules[i] = (key, fn(payload))
                count += 1
        return count


def split_device_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """A CUDA/ROCm-style device module's bytes: (format, function-table bytes, data).

    The function table maps kernel name -> FunctionInfo (name, argument dtypes as 4-byte
    DLDataTypes, launch-parameter tags, 4-byte extra argument tags)."""
    r = _Reader(payload)
    fmt = r.bytes_().decode()
    start = r.pos
    for _ in range(r.u64()):
        r.bytes_()  # key
        r.bytes_()  # FunctionInfo.name
        r.raw(4 * r.u64())  # arg_types
        for _ in range(r.u64()):  # launch_param_tags
            r.bytes_()
        r.raw(4 * r.u64())  # arg_extra_tags
    fmap = payload[start : r.pos]
    data = r.bytes_()
    if r.pos != len(payload):
        raise ValueError("device module bytes do not end after their data")
    return fmt, fmap, data


def kernel_names(fmap: bytes) -> list[str]:
    r = _Reader(fmap)
    names = []
    for _ in range(r.u64()):
        names.append(r.bytes_().decode())
        r.bytes_()
        r.raw(4 * r.u64())
        for _ in range(r.u64()):
            r.bytes_()
        r.raw(4 * r.u64())
    return names


def join_device_payload(fmt: str, fmap: bytes, data: bytes) -> bytes:
    return _bytes(fmt.encode()) + fmap + _bytes(data)


def write_blob_asm(blob: bytes, workspace: Path, symbol: str = "__tvm_ffi__library_bin") -> Path:
    """An assembly file defining `symbol` as the blob (via .incbin: fast for large binaries)."""
    data = workspace / "kiln_devices.bin"
    data.write_bytes(blob)
    asm = workspace / "kiln_devices.S"
    asm.write_text(
        f'\t.section .rodata\n\t.globl {symbol}\n\t.p2align 4\n{symbol}:\n\t.incbin "{data}"\n'
        '\t.section .note.GNU-stack,"",@progbits\n'
    )
    return asm


def split_metal_payload(payload: bytes) -> tuple[str, bytes, dict[str, str]]:
    """A Metal module's bytes: (format, function-table bytes, kernel name -> its MSL source).
    The layout of `split_device_payload`, with one source per kernel where the data is."""
    r = _Reader(payload)
    fmt = r.bytes_().decode()
    start = r.pos
    for _ in range(r.u64()):  # the function table, as in split_device_payload
        r.bytes_()
        r.bytes_()
        r.raw(4 * r.u64())
        for _ in range(r.u64()):
            r.bytes_()
        r.raw(4 * r.u64())
    fmap = payload[start : r.pos]
    sources = {r.bytes_().decode(): r.bytes_().decode() for _ in range(r.u64())}
    if r.pos != len(payload):
        raise ValueError("Metal module bytes do not end after their sources")
    return fmt, fmap, sources
