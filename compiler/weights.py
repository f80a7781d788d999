"""Reading Hugging Face checkpoints and converting them into Kiln parameter shards.

Two pieces live here:

* `Checkpoint` reads a checkpoint directory lazily. Only the safetensors headers are read when
  it is opened; tensor data is read one tensor at a time, on request. Pickle checkpoints
  (``pytorch_model.bin``, ``*.pt``) are refused outright, because unpickling runs arbitrary code.
* `plan` / `convert` apply a *weight map* (the mlc-llm idea): every model parameter names
  exactly one `Source` of checkpoint tensors, and every checkpoint tensor must be used by some
  parameter or be explicitly ignored. A checkpoint that does not match the model therefore
  fails loudly, before any data is read, instead of compiling into a model that emits garbage.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

import numpy as np

from ..runtime.errors import KilnError

__all__ = ["Checkpoint", "Progress", "ProgressLine", "Source", "convert", "plan"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OUTPUT_INDEX = "params-index.json"

# The safetensors reference implementation rejects headers above this size; anything larger
# means the length prefix is garbage, and we must not try to allocate it.
_MAX_HEADER_BYTES = 100_000_000

# Bytes per element, used to check each header entry against its byte range. Dtypes not
# listed here (sub-byte float formats, future additions) are still indexed, just not checked;
# `read` refuses them anyway.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_READABLE = ("F32", "F16", "BF16")
# NumPy dtypes of the tensors `Checkpoint.read_stored` returns as they are stored.
_STORED = {
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
}
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
_SHARD_NAME = re.compile(r"params-\d{5}\.safetensors")
# How many offending names an error message lists before summarising the rest.
_LIST_LIMIT = 5


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    if len(items) > _LIST_LIMIT:
        shown += f" and {len(items) - _LIST_LIMIT} more"
    return shown


def _corrupt(path: Path, why: str) -> KilnError:
    return KilnError(f"file {path} is not a valid safetensors file ({why}): re-download it")


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parses one safetensors header and checks the file is as long as the header claims."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"only {size} bytes, too short for a header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length field says {header_len} bytes")
            if 8 + header_len > size:
                raise KilnError(
                    f"file {path} is truncated or corrupt ({size} bytes, header says at least "
                    f"{8 + header_len}): re-download it"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise KilnError(f"cannot read weight file {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, "header is not valid JSON") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    data_start = 8 + header_len
    data_end = 0
    tensors: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _corrupt(path, f"malformed header entry for tensor {name}")
        itemsize = _DTYPE_BYTES.get(dtype)
        if itemsize is not None and int(np.prod(shape, dtype=np.int64)) * itemsize != end - begin:
            raise _corrupt(
                path, f"tensor {name} is {dtype} {list(shape)} but spans {end - begin} bytes"
            )
        data_end = max(data_end, end)
        tensors[name] = _TensorInfo(path, dtype, shape, data_start + begin, end - begin)

    expected = data_start + data_end
    if size != expected:
        raise KilnError(
            f"file {path} is truncated or corrupt ({size} bytes, header says {expected}): "
            "re-download it"
        )
    return tensors


class Checkpoint:
    """A Hugging Face safetensors checkpoint directory, read lazily.

    Construction reads every shard header (names, shapes, dtypes, owning file) and validates
    file sizes; `read` then pulls one tensor at a time, keeping at most one file open.
    Use as a context manager, or call `close`, to release that file.
    """

    def __init__(self, model_dir: Path | str) -> None:
        self._fh: IO[bytes] | None = None
        self._fh_path: Path | None = None
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise KilnError(
                f"model directory {self.model_dir} does not exist or is not a directory: "
                "pass the folder holding config.json and the *.safetensors files"
            )
        self._tensors: dict[str, _TensorInfo] = {}
        self._files: list[Path] = []
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            self._load_indexed(index)
        else:
            self._load_unindexed()

    # -- discovery ---------------------------------------------------------------------------

    def _load_indexed(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise KilnError(
                f"index {index} is not a valid safetensors index (expected JSON with a "
                '"weight_map" of tensor name -> shard file): re-download it'
            ) from e
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (self.model_dir / shard).is_file():
                raise KilnError(
                    f"index {index} names shard {shard}, but {self.model_dir / shard} does not "
                    "exist: download the missing shard"
                )
        self._add_files(self.model_dir / s for s in shards)
        for name, shard in sorted(weight_map.items()):
            info = self._tensors.get(name)
            if info is None or info.file != self.model_dir / shard:
                where = f"is in {info.file}" if info is not None else "is in no shard"
                raise KilnError(
                    f"index {index} says tensor {name} is in {shard}, but it {where}: the "
                    "index and shards disagree; re-download the checkpoint"
                )

    def _load_unindexed(self) -> None:
        # Matches transformers: a lone model.safetensors wins over other *.safetensors files
        # (e.g. Mistral's consolidated.safetensors duplicating the same weights).
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            self._add_files([single])
            return
        files = sorted(p for p in self.model_dir.glob("*.safetensors") if p.is_file())
        if files:
            self._add_files(files)
            return
        pickles = sorted(
            p.name for pat in _PICKLE_PATTERNS for p in self.model_dir.glob(pat) if p.is_file()
        )
        if pickles:
            raise KilnError(
                f"{self.model_dir} holds only pickle checkpoints ({_listing(pickles)}); Kiln "
                "never loads pickles because they can run arbitrary code: convert to safetensors "
                "first, e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                "safe_serialization=True)"
            )
        raise KilnError(
            f"no weights found in {self.model_dir}: expected {SINGLE_FILE}, {INDEX_FILE} or "
            "*.safetensors files; point Kiln at a downloaded Hugging Face model directory"
        )

    def _add_files(self, files: Iterable[Path]) -> None:
        for path in files:
            for name, info in _read_header(path).items():
                other = self._tensors.get(name)
                if other is not None:
                    raise KilnError(
                        f"tensor {name} is in both {other.file} and {path}: the directory holds "
                        "two copies of the weights; keep only one set of files"
                    )
                self._tensors[name] = info
            self._files.append(path)
        self._files.sort()

    # -- queries -----------------------------------------------------------------------------

    def _info(self, name: str) -> _TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            raise KilnError(f"tensor {name} is not in checkpoint {self.model_dir}")
        return info

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. ``"BF16"``."""
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor's data in its file."""
        return self._info(name).nbytes

    def file_of(self, name: str) -> Path:
        return self._info(name).file

    def files(self) -> list[Path]:
        """The weight files in use, sorted by name (so shard 1 comes first)."""
        return list(self._files)

    # -- data --------------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        """Reads one tensor as float32 (exact for F32, F16 and BF16)."""
        info = self._info(name)
        if info.dtype not in _READABLE:
            raise KilnError(_dtype_message(name, info))
        buf = self._read_bytes(name, info, "<u2" if info.dtype == "BF16" else _STORED[info.dtype])
        if info.dtype == "BF16":
            # bf16 is the top half of an f32, so widening the bits is exact (shifted in place:
            # an embedding can be 2 GB as float32).
            wide = buf.astype(np.uint32)
            del buf
            wide <<= 16
            out = wide.view(np.float32)
        else:
            out = buf.astype(np.float32, copy=False)
        return out.reshape(info.shape)

    def read_stored(self, name: str) -> np.ndarray:
        """Reads one tensor in the dtype it is stored in (e.g. a pre-quantized checkpoint's
        packed int32 words), without widening it to float32."""
        info = self._info(name)
        if info.dtype not in _STORED:
            raise KilnError(
                f"tensor {name} in {info.file} has dtype {info.dtype}, which Kiln cannot read"
            )
        return self._read_bytes(name, info, _STORED[info.dtype]).reshape(info.shape)

    def _read_bytes(self, name: str, info: _TensorInfo, dtype: str) -> np.ndarray:
        buf = np.empty(info.nbytes // np.dtype(dtype).itemsize, dtype=dtype)
        fh = self._handle(info.file)
        try:
            fh.seek(info.start)
            got = fh.readinto(memoryview(buf.view(np.uint8)))
        except OSError as e:
            raise KilnError(f"cannot read tensor {name} from {info.file}: {e}") from e
        if got != info.nbytes:
            raise KilnError(
                f"file {info.file} is truncated or corrupt (tensor {name} ends past the end of "
                "the file; did it change while Kiln was reading?): re-download it"
            )
        return buf

    def _handle(self, path: Path) -> IO[bytes]:
        if self._fh is None or self._fh_path != path:
            self.close()
            try:
                self._fh = open(path, "rb")
            except OSError as e:
                raise KilnError(f"cannot open weight file {path}: {e.strerror or e}") from e
            self._fh_path = path
        return self._fh

    def close(self) -> None:
        """Closes the open shard, if any; later reads reopen it."""
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self._fh_path = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have raised before the handle attribute existed.
        if getattr(self, "_fh", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self._tensors)} tensors)"


def _dtype_message(name: str, info: _TensorInfo) -> str:
    return (
        f"tensor {name} in {info.file} has dtype {info.dtype}, but Kiln reads only F32, F16 "
        "and BF16 checkpoints: use the original unquantized checkpoint"
    )


# -- weight maps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one model parameter comes from.

    ``combine`` turns the named checkpoint tensors (read as float32, in order) into the
    parameter, e.g. stacking q/k/v; ``None`` means exactly one tensor, used as is.
    ``shapes`` gives each named tensor's expected shape when ``combine`` is set, so that a
    checkpoint that does not fit is refused before any compile work (a q/k split that still
    adds up to the right total would otherwise pass).
    ``dtypes``, when set, gives each named tensor's required safetensors dtype; such tensors
    are read as stored, not widened to float32. Pre-quantized checkpoints need this: their
    packed integer words are data to repack, not numbers to convert.
    """

    names: tuple[str, ...]
    combine: Callable[[list[np.ndarray]], np.ndarray] | None = None
    shapes: tuple[tuple[int, ...], ...] | None = None
    dtypes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise TypeError(f"Source.names must be a tuple of names, not the string {self.names!r}")
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise ValueError("Source needs at least one checkpoint tensor name")
        if self.combine is None and len(self.names) != 1:
            raise ValueError(f"Source{self.names} has several tensors but no combine function")
        if self.shapes is not None and len(self.shapes) != len(self.names):
            raise ValueError(f"Source{self.names} needs one expected shape per tensor")
        if self.dtypes is not None and len(self.dtypes) != len(self.names):
            raise ValueError(f"Source{self.names} needs one dtype per tensor")

    def read(self, ckpt: Checkpoint) -> list[np.ndarray]:
        """The named tensors: as float32, or as stored when `dtypes` is set."""
        if self.dtypes is None:
            return [ckpt.read(t) for t in self.names]
        return [ckpt.read_stored(t) for t in self.names]


def plan(
    ckpt: Checkpoint,
    params: dict[str, tuple[int, ...]],
    weight_map: dict[str, Source],
    ignore: Sequence[str] = (),
) -> list[str]:
    """Checks the weight map against the checkpoint header and returns the conversion order.

    Nothing is read but headers. The order groups parameters by the shard holding their first
    source tensor (shards in `Checkpoint.files` order, model order within a shard), so
    `convert` reads the checkpoint roughly sequentially.
    """
    unmapped = [p for p in params if p not in weight_map]
    if unmapped:
        raise KilnError(
            f"bug in Kiln's weight map: no source for model parameter(s) {_listing(unmapped)} "
            "(please report this)"
        )
    extra = [p for p in weight_map if p not in params]
    if extra:
        raise KilnError(
            f"bug in Kiln's weight map: entries for {_listing(extra)}, which are not model "
            "parameters (please report this)"
        )

    missing = [
        f"{t} (for {p})" for p, src in weight_map.items() for t in src.names if t not in ckpt
    ]
    if missing:
        raise KilnError(
            f"tensor(s) {_listing(missing)} not found in checkpoint {ckpt.model_dir}: the "
            "checkpoint does not match config.json (wrong model directory, or this "
            "architecture variant is not supported)"
        )

    user: dict[str, str] = {}
    shared = []
    for p, src in weight_map.items():
        for t in dict.fromkeys(src.names):  # the same tensor twice within one param is fine
            if t in user:
                shared.append(f"{t} in {ckpt.file_of(t)} (by {user[t]} and {p})")
            else:
                user[t] = p
    if shared:
        raise KilnError(
            f"bug in Kiln's weight map: checkpoint tensor(s) used by two parameters: "
            f"{_listing(shared)} (please report this)"
        )

    bad_shape = []
    for p, src in weight_map.items():
        expected = [tuple(params[p])] if src.combine is None else src.shapes or []
        for t, shape in zip(src.names, expected, strict=False):
            if ckpt.shape(t) != tuple(shape):
                bad_shape.append(
                    f"tensor {t} in {ckpt.file_of(t)} has shape {list(ckpt.shape(t))} but "
                    f"parameter {p} needs {list(shape)} from it"
                )
    if bad_shape:
        raise KilnError(
            f"{_listing(bad_shape)}: the checkpoint does not match config.json (check that "
            "config.json belongs to these weights)"
        )

    for p, src in weight_map.items():
        for i, t in enumerate(src.names):
            if src.dtypes is None and ckpt.dtype(t) not in _READABLE:
                raise KilnError(_dtype_message(t, ckpt._info(t)))
            if src.dtypes is not None and ckpt.dtype(t) != src.dtypes[i]:
                raise KilnError(
                    f"tensor {t} in {ckpt.file_of(t)} has dtype {ckpt.dtype(t)} but parameter "
                    f"{p} needs {src.dtypes[i]}: the checkpoint does not match its config.json"
                )

    patterns = [re.compile(pat) for pat in ([ignore] if isinstance(ignore, str) else ignore)]
    unexpected = [
        f"{t} in {ckpt.file_of(t)}"
        for t in ckpt.names()
        if t not in user and not any(pat.fullmatch(t) for pat in patterns)
    ]
    if unexpected:
        noun = "tensor" if len(unexpected) == 1 else "tensors"
        raise KilnError(
            f"unexpected {noun} {_listing(unexpected)}: the checkpoint does not match "
            "config.json (or this architecture is not supported)"
        )

    shard_rank = {f: i for i, f in enumerate(ckpt.files())}
    model_rank = {p: i for i, p in enumerate(params)}
    return sorted(
        params, key=lambda p: (shard_rank[ckpt.file_of(weight_map[p].names[0])], model_rank[p])
    )


@dataclass(frozen=True)
class Progress:
    """How far a conversion has come: checkpoint tensors and their bytes read so far."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float  # seconds since the conversion started

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (by bytes), or None before there is a rate."""
        if self.bytes_done <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.2f} {unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
    """Draws `Progress` as one line redrawn in place (carriage return), e.g.
    ``converting weights: 120/291 tensors, 5.43 GB/13.48 GB, ETA 1:07``.

    Redraws at most every `interval` seconds, and always the first and the last state (which
    ends the line), so a fast conversion costs a few writes, not one per tensor.
    """

    def __init__(
        self, stream: TextIO, label: str = "converting weights", interval: float = 0.2
    ) -> None:
        self.stream, self.label, self.interval = stream, label, interval
        self._last_draw: float | None = None
        self._width = 0
        self._open = False  # a line is drawn and not yet ended

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final = p.tensors_done == p.tensors_total
        if not final and self._last_draw is not None and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        text = (
            f"{self.label}: {p.tensors_done}/{p.tensors_total} tensors, "
            f"{_size(p.bytes_done)}/{_size(p.bytes_total)}, "
            + (f"done in {_duration(p.elapsed)}" if final else f"ETA {_duration(p.eta)}")
        )
        self.stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
        self.stream.flush()
        self._width, self._open = len(text), not final

    def end(self) -> None:
        """Ends a line left unfinished (the conversion failed), so what is printed next, such
        as the error, starts on a line of its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


# safetensors dtype of each dtype name, in the order safetensors' writer lays tensors out in a
# file (its Dtype enum, largest first; then by name). Kiln's shards use the same layout, so they
# are byte for byte what safetensors.numpy.save_file would write.
_ST_DTYPES = {
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
    "float32": "F32",
    "uint32": "U32",
    "int32": "I32",
    "bfloat16": "BF16",
    "float16": "F16",
    "uint16": "U16",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_ST_RANK = {name: rank for rank, name in enumerate(_ST_DTYPES)}

Spec = dict[str, tuple[tuple[int, ...], str]]  # output name -> (shape, dtype name)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _header(entries: Spec) -> tuple[bytes, dict[str, int]]:
    """A safetensors file's header (length prefix included) for `entries`, and where each
    tensor's data starts in the file."""
    order = sorted(entries, key=lambda k: (_ST_RANK[entries[k][1]], k))
    header, begin = {}, 0
    for key in order:
        shape, dtype = entries[key]
        end = begin + _nbytes(shape, dtype)
        header[key] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [begin, end],
        }
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    data = 8 + len(text)
    offsets = {k: data + v["data_offsets"][0] for k, v in header.items()}
    return len(text).to_bytes(8, "little") + text, offsets


class _ShardWriter:
    """Output shards written tensor by tensor: each file's header is fixed from the spec before
    its first tensor arrives, and each tensor goes straight to its offset. Memory holds one
    converted parameter, never a shard. A file is written under a temporary name and renamed
    once its last tensor is in, so an interrupted run never leaves a plausible-looking shard.
    """

    def __init__(self, out_dir: Path, shards: dict[str, Spec]) -> None:
        self.out_dir, self.shards = out_dir, shards
        self.missing = {name: set(spec) for name, spec in shards.items()}
        self.offsets: dict[str, int] = {}
        self.open: dict[str, IO[bytes]] = {}

    def write(self, shard: str, key: str, array: np.ndarray) -> None:
        fh = self.open.get(shard)
        if fh is None:
            header, offsets = _header(self.shards[shard])
            self.offsets.update(offsets)
            fh = self.open[shard] = open(self.out_dir / (shard + ".tmp"), "wb")
            fh.write(header)
        fh.seek(self.offsets[key])
        # The raw bytes, in C order (a transposed view would otherwise be scrambled).
        fh.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.missing[shard].discard(key)
        if not self.missing[shard]:
            fh.close()
            del self.open[shard]
            os.replace(self.out_dir / (shard + ".tmp"), self.out_dir / shard)
            # An artifact is meant to be shared and copied: not owner-only.
            os.chmod(self.out_dir / shard, 0o644)

    def abandon(self) -> None:
        for shard, fh in self.open.items():
            fh.close()
            (self.out_dir / (shard + ".tmp")).unlink(missing_ok=True)
        self.open.clear()


def _assign_shards(
    order: list[str], specs: dict[str, Spec], shard_bytes: int
) -> tuple[dict[str, str], dict[str, Spec]]:
    """Output name -> shard file, in conversion order; a new shard starts where the next tensor
    would push the current one past `shard_bytes`."""
    index: dict[str, str] = {}
    shards: dict[str, Spec] = {}
    current: Spec | None = None
    size = 0
    for p in order:
        for key, (shape, dtype) in specs[p].items():
            if key in index:
                raise KilnError(
                    f"bug in Kiln: output {key} (from parameter {p}) is produced twice "
                    "(please report this)"
                )
            if dtype not in _ST_DTYPES:
                raise KilnError(f"bug in Kiln: output {key} has dtype {dtype} (please report)")
            n = _nbytes(shape, dtype)
            if current is None or (current and size + n > shard_bytes):
                current, size = {}, 0
                shards[f"params-{len(shards) + 1:05d}.safetensors"] = current
            current[key] = (tuple(shape), dtype)
            size += n
            index[key] = next(reversed(shards))
    return index, shards


def convert(
    ckpt: Checkpoint,
    params: dict[str, tuple[int, ...]],
    weight_map: dict[str, Source],
    transform: Callable[[str, np.ndarray], dict[str, np.ndarray]],
    out_dir: Path,
    ignore: Sequence[str] = (),
    shard_bytes: int = 1 << 30,
    progress: Callable[[Progress], None] | None = None,
    outputs: Callable[[str], Spec] | None = None,
) -> dict[str, str]:
    """Streams the checkpoint into ``params-NNNNN.safetensors`` shards in ``out_dir``.

    Each parameter is read, combined, checked against ``params``, passed through
    ``transform`` (which may emit several outputs, e.g. quantized data and scales) and written
    to its place in an output shard before the next parameter is read, so memory holds one
    parameter at a time. ``outputs(p)`` says what ``transform`` makes of parameter ``p``
    (output name -> (shape, dtype name)), which fixes every shard's layout up front; by
    default each parameter becomes itself, as float32. A shard holds what fits in
    ``shard_bytes`` (or one larger tensor). Output is deterministic: the same inputs give
    byte-identical files, laid out as safetensors' own writer lays them out.
    Returns ``{output name: shard file name}``, also written to ``params-index.json``.
    Stale ``params-*.safetensors`` from an earlier run in ``out_dir`` are removed.
    ``progress`` is called before the first parameter and after each one.
    """
    order = plan(ckpt, params, weight_map, ignore)
    if outputs is None:

        def outputs(p: str) -> Spec:
            return {p: (tuple(params[p]), "float32")}

    specs = {p: {k: (tuple(s), d) for k, (s, d) in outputs(p).items()} for p in order}
    index, shards = _assign_shards(order, specs, shard_bytes)
    sizes = [sum(ckpt.nbytes(t) for t in dict.fromkeys(weight_map[p].names)) for p in order]
    counts = [len(dict.fromkeys(weight_map[p].names)) for p in order]
    start, tensors_done, bytes_done = time.monotonic(), 0, 0

    def report() -> None:
        if progress is not None:
            elapsed = time.monotonic() - start
            progress(Progress(tensors_done, sum(counts), bytes_done, sum(sizes), elapsed))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shards)

    try:
        if order:
            report()
        for i, p in enumerate(order):
            src = weight_map[p]
            arrays = src.read(ckpt)
            value = arrays[0] if src.combine is None else np.asarray(src.combine(arrays))
            del arrays
            if tuple(value.shape) != tuple(params[p]):
                raise KilnError(
                    f"parameter {p} built from {_describe_sources(ckpt, src.names)} has shape "
                    f"{list(value.shape)} but the model needs {list(params[p])}: the checkpoint "
                    "does not match config.json"
                )
            made = transform(p, value)
            del value
            got = {k: (tuple(a.shape), str(a.dtype)) for k, a in made.items()}
            if got != specs[p]:
                raise KilnError(
                    f"bug in Kiln: parameter {p} converted to {got}, expected {specs[p]} "
                    "(please report this)"
                )
            for key, arr in made.items():
                writer.write(index[key], key, arr)
            del made
            tensors_done, bytes_done = tensors_done + counts[i], bytes_done + sizes[i]
            report()
    except BaseException:
        writer.abandon()
        raise
    finally:
        ckpt.close()

    for stale in out_dir.glob("params-*.safetensors"):
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in shards:
            stale.unlink()
    result = dict(sorted(index.items()))
    (out_dir / OUTPUT_INDEX).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _describe_sources(ckpt: Checkpoint, names: Sequence[str]) -> str:
    by_file: dict[Path, list[str]] = {}
    for t in names:
        by_file.setdefault(ckpt.file_of(t), []).append(t)
    return "; ".join(f"{', '.join(ts)} in {f}" for f, ts in by_file.items())
