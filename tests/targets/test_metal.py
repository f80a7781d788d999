"""The Metal target on Linux: a macOS arm64 dylib (linked by zig) that carries the Relax VM, the
host launchers and every kernel's Metal Shading Language source.

Loading it needs a Mac with the macOS apache-tvm wheel, so what is checked here is the file: its
Mach-O header and load commands, its symbols, and the module blob a Mac's TVM would read.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kiln
from kiln import targets
from kiln.runtime.artifact import read_manifest
from kiln.runtime.errors import KilnError
from kiln.targets import get_target, metal
from kiln.targets.blob import Blob, kernel_names, split_metal_payload

FAMILIES = ["llama", "llama3", "mistral", "mixtral"]

MH_MAGIC_64, CPU_TYPE_ARM64, MH_DYLIB = 0xFEEDFACF, 0x0100000C, 6
LC_SYMTAB, LC_LOAD_DYLIB, LC_ID_DYLIB, LC_SEGMENT_64 = 0x2, 0xC, 0xD, 0x19
LC_CODE_SIGNATURE, LC_BUILD_VERSION, PLATFORM_MACOS = 0x1D, 0x32, 1
LC_DYLD_INFO_ONLY = 0x80000022
FLAT_LOOKUP = -2  # bind ordinal: search every image loaded in the process


@dataclass
class MachO:
    cputype: int
    filetype: int
    commands: set[int] = field(default_factory=set)
    dylib_id: str = ""
    dylibs: list[str] = field(default_factory=list)
    minos: tuple[int, int] = (0, 0)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (vmaddr, size, fileoff)
    symbols: dict[str, int] = field(default_factory=dict)  # external symbol table: name -> addr
    exported: set[str] = field(default_factory=set)  # the export trie dlsym searches
    binds: dict[str, int] = field(default_factory=dict)  # imported name -> dylib ordinal


def read_macho(data: bytes) -> MachO:
    magic, cputype, _, filetype, ncmds = struct.unpack_from("<IiiII", data, 0)
    assert magic == MH_MAGIC_64, hex(magic)
    m = MachO(cputype, filetype)
    at = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, at)
        m.commands.add(cmd)
        if cmd in (LC_ID_DYLIB, LC_LOAD_DYLIB):
            (name_at,) = struct.unpack_from("<I", data, at + 8)
            name = data[at + name_at : at + size].split(b"\0")[0].decode()
            if cmd == LC_LOAD_DYLIB:
                m.dylibs.append(name)
            else:
                m.dylib_id = name
        elif cmd == LC_BUILD_VERSION:
            platform, minos = struct.unpack_from("<II", data, at + 8)
            assert platform == PLATFORM_MACOS
            m.minos = (minos >> 16, (minos >> 8) & 0xFF)
        elif cmd == LC_SEGMENT_64:
            vmaddr, vmsize, fileoff = struct.unpack_from("<QQQ", data, at + 24)
            m.segments.append((vmaddr, vmsize, fileoff))
        elif cmd == LC_SYMTAB:
            symoff, nsyms, stroff = struct.unpack_from("<III", data, at + 8)
            for i in range(nsyms):
                strx, ntype, _, _, value = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
                name = data[stroff + strx : data.index(b"\0", stroff + strx)].decode()
                if ntype & 0xE0:  # debugging entry
                    continue
                if ntype & 0x0E == 0x0E and ntype & 0x01:  # N_SECT | N_EXT: exported
                    m.symbols[name] = value
        elif cmd == LC_DYLD_INFO_ONLY:
            _, _, bind, bind_size, _, _, lazy, lazy_size, trie, _ = struct.unpack_from(
                "<10I", data, at + 8
            )
            m.binds = {**_binds(data, bind, bind_size), **_binds(data, lazy, lazy_size)}
            m.exported = _exports(data, trie)
        at += size
    return m


def _uleb(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            return value, at


def _binds(data: bytes, at: int, size: int) -> dict[str, int]:
    """Symbol -> dylib ordinal of each bind dyld performs (its bind opcode stream)."""
    binds, ordinal, symbol, end = {}, 0, "", at + size
    while at < end:
        op, imm = data[at] & 0xF0, data[at] & 0x0F
        at += 1
        if op == 0x10:  # SET_DYLIB_ORDINAL_IMM
            ordinal = imm
        elif op == 0x20:  # SET_DYLIB_ORDINAL_ULEB
            ordinal, at = _uleb(data, at)
        elif op == 0x30:  # SET_DYLIB_SPECIAL_IMM: 0, -1, -2 (flat lookup)
            ordinal = imm - 16 if imm else 0
        elif op == 0x40:  # SET_SYMBOL_TRAILING_FLAGS_IMM, then the name
            symbol = data[at : data.index(b"\0", at)].decode()
            at += len(symbol) + 1
        elif op in (0x60, 0x70, 0x80, 0xA0):  # addend, segment offset, address step: a LEB128
            at = _uleb(data, at)[1]
        elif op == 0xC0:  # DO_BIND_ULEB_TIMES_SKIPPING_ULEB
            at = _uleb(data, _uleb(data, at)[1])[1]
        if op in (0x90, 0xA0, 0xB0, 0xC0):  # DO_BIND*
            binds[symbol] = ordinal
    return binds


def _exports(data: bytes, trie: int) -> set[str]:
    """Names in the export trie (what dlsym finds)."""
    names, todo = set(), [(trie, "")]
    while todo:
        at, prefix = todo.pop()
        terminal, at = _uleb(data, at)
        if terminal:
            names.add(prefix)
        children, at = data[at + terminal], at + terminal + 1
        for _ in range(children):
            label = data[at : data.index(b"\0", at)].decode()
            child, at = _uleb(data, at + len(label) + 1)
            todo.append((trie + child, prefix + label))
    return names


def library_blob(data: bytes, m: MachO) -> Blob:
    """The module blob TVM reads from `__tvm_ffi__library_bin` when it loads the library."""
    address = m.symbols["___tvm_ffi__library_bin"]
    (offset,) = [f + address - a for a, size, f in m.segments if a <= address < a + size]
    (length,) = struct.unpack_from("<Q", data, offset)
    return Blob.parse(data[offset : offset + 8 + length])


def check_dylib(library: Path) -> dict[str, str]:
    """Check a Metal library the way a Mac would use it; returns its kernels' MSL sources."""
    data = library.read_bytes()
    m = read_macho(data)
    assert (m.cputype, m.filetype) == (CPU_TYPE_ARM64, MH_DYLIB)
    # Apple Silicon runs only signed code: the linker's ad-hoc signature is enough for dlopen.
    assert LC_CODE_SIGNATURE in m.commands
    assert m.minos == (11, 0) and m.dylib_id == f"@rpath/{library.name}"
    assert m.dylibs == ["/usr/lib/libSystem.B.dylib"]
    # The TVM runtime's functions come from the process (the macOS wheel), the rest from
    # libSystem (dylib 1); TVM fills the library's own ___TVMFFI* pointers when it loads it.
    imports = {name: ordinal for name, ordinal in m.binds.items() if name not in m.symbols}
    assert imports and all(
        ordinal == (FLAT_LOOKUP if name.startswith("_TVMFFI") else 1)
        for name, ordinal in imports.items()
    ), imports

    blob = library_blob(data, m)
    assert [key for key, _ in blob.modules] == ["relax.VMExecutable", "_lib", "metal"]
    fmt, fmap, sources = split_metal_payload(blob.modules[2][1])
    names = kernel_names(fmap)
    assert fmt == "metal" and names and set(names) == set(sources)
    for name in names:
        assert f"kernel void {name}(" in sources[name]
        assert "double" not in sources[name] and "bfloat" not in sources[name]
        # the host function that launches it (f launches f_kernel, f_kernel_1, ...) is exported
        assert "___tvm_ffi_" + re.sub(r"_kernel(_\d+)?$", "", name) in m.exported
    assert {"___tvm_ffi__library_bin", "___tvm_ffi__library_ctx"} <= m.exported
    assert m.exported == set(m.symbols)
    return sources


@pytest.fixture(scope="module")
def tiny_metal(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metal") / "tiny"
    return kiln.compile(
        str(checkpoint("tiny-llama")), target="metal", quantization="q0f16", output=out
    )


def test_metal_library_is_a_macos_arm64_dylib_with_every_kernel(tiny_metal):
    manifest = read_manifest(tiny_metal)  # checks every file's sha256
    assert manifest.data["library"] == "model-metal.dylib"
    assert "libraries" not in manifest.data
    target = manifest.data["target"]
    assert (target["device"], target["arch"], target["format"]) == ("metal", "apple-m1", "metal")
    sources = check_dylib(manifest.library)
    assert sorted(sources) == target["kernels"]
    assert any("half" in source for source in sources.values())  # q0f16 computes in half


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_compiles_for_metal(name, checkpoint, tmp_path):
    art = kiln.compile(
        str(checkpoint(name)), target="metal", quantization="q0f16", output=tmp_path / "a"
    )
    check_dylib(art / "model-metal.dylib")


def test_metal_runs_float16_and_float32_only(checkpoint, tmp_path):
    assert metal.METAL.dtypes == ("float32", "float16")
    with pytest.raises(KilnError, match=r"computes in bfloat16.*q0f32.*q0f16"):
        kiln.compile(
            str(checkpoint("tiny-llama")), target="metal", quantization="q0bf16",
            output=tmp_path / "a",
        )  # fmt: skip


def test_bad_arch_is_a_clear_error():
    assert metal.METAL.target("apple-m2").host.attrs["mcpu"] == "apple-m2"
    with pytest.raises(KilnError, match="not an Apple CPU"):
        metal.METAL.target("skylake")


def test_link_failure_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="zig could not link"):
        metal.link_dylib(str(tmp_path / "x.dylib"), [str(tmp_path / "missing.o")])


@pytest.mark.parametrize(
    "nvidia, amd, system, expected",
    [
        (1, ["gfx942"], ("darwin", "arm64"), "cuda"),
        (0, ["gfx942"], ("darwin", "arm64"), "rocm"),
        (0, [], ("darwin", "arm64"), "metal"),
        (0, [], ("darwin", "x86_64"), "cpu"),
        (0, [], ("linux", "x86_64"), "cpu"),
    ],
)
def test_auto_picks_the_best_target_present(nvidia, amd, system, expected, monkeypatch):
    monkeypatch.setattr(targets, "nvidia_gpus", lambda: nvidia)
    monkeypatch.setattr(targets, "amd_gpu_archs", lambda: amd)
    monkeypatch.setattr(targets, "_loads", lambda *names: object())  # libamdhip64 "loads"
    monkeypatch.setattr(targets.sys, "platform", system[0])
    monkeypatch.setattr(targets.platform, "machine", lambda: system[1])
    assert targets.detect_target() == expected
    assert get_target("auto").name == expected
