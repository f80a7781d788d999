"""Where an artifact's code runs: one Relax VM on one device (`LocalExecutor`), or one VM per
GPU of a tensor-parallel artifact in a Disco session (kiln.runtime.disco.executor). `Runner`
drives either through the small contract `Executor` below, so the engine above it is the same.

    decode = ex.function("decode")                       # an entry point of the artifact
    out = decode(ex.upload(ids), cache, params)          # inputs go to every worker
    logits = ex.view(ex.item(out, 0), (rows, vocab), "float32")
    ex.numpy(logits, (rows, vocab), "float32")           # worker 0's copy, on the host

`open_executor` picks one from the artifact and the devices asked for, and says what is wrong
when they do not fit (too few GPUs, a tensor-parallel artifact on the CPU, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import vm as tvm_vm

from kiln.runtime.artifact import Manifest
from kiln.runtime.device import device_arch, device_count, open_device, parse_device
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import load_externs
from kiln.runtime.safetensors import load_safetensors


class Executor(Protocol):
    """What `Runner` needs of the place its artifact runs. Values it hands back (tensors, the KV
    cache, results) are opaque: they go back into these calls, never into TVM directly."""

    device: Any  # where worker 0 runs (the only device of a local run)
    devices: list[Any]  # every worker's device
    vm: Any  # the loaded library: a VirtualMachine, or a Disco module
    single_caller: bool  # calls must come from one thread at a time (a Disco session)

    def function(self, name: str) -> Callable[..., Any]:
        """The artifact's entry point `name`, run by every worker."""

    def builtin(self, name: str) -> Callable[..., Any]:
        """TVM's global function `name` (vm.builtin.*), run by every worker."""

    def upload(self, array: np.ndarray) -> Any:
        """A copy of a host array on every worker's device."""

    def item(self, value: Any, index: int) -> Any:
        """Item `index` of a tuple an entry point returned."""

    def view(self, tensor: Any, shape: Sequence[int], dtype: str) -> Any:
        """`tensor` seen with another shape (as many elements)."""

    def numpy(self, tensor: Any, shape: Sequence[int], dtype: str) -> np.ndarray:
        """Worker 0's copy of `tensor` (of this shape and dtype) on the host."""

    def read(self, value: Any) -> Any:
        """Worker 0's value of a builtin's scalar result (an int)."""

    def load_params(self, manifest: Manifest) -> Any:
        """The artifact's weights on every worker, as the list its entry points take last."""

    def close(self) -> None:
        """Let go of a Disco session, whose workers then exit (the runner lets go of its
        handles first)."""


# Input buffers reused round robin: more than the inputs of one pass (sampling takes five).
STAGING_SLOTS = 8


class Staging:
    """Device buffers that uploads are copied into (a view of one a call), allocated once and
    grown, instead of a fresh tensor per call: device tensors come straight from the device
    API, and a CUDA free waits for the whole GPU (a batch-1 decode step spent its cudaFree
    waiting for the step before, and paid a cudaMalloc and a cudaMemGetInfo besides). The slots
    go round, so that one pass's inputs (fewer than STAGING_SLOTS) each get their own; a copy
    into a slot is ordered after the work that read it last (one stream)."""

    def __init__(self, empty: Callable[[int], Any], view: Callable[..., Any]):
        self._empty, self._view = empty, view  # (bytes) -> uint8 buffer; (buffer, shape, dtype)
        self._slots: list[tuple[Any, int]] = [(None, 0)] * STAGING_SLOTS  # (buffer, bytes)
        self._next = 0

    def view(self, array: np.ndarray) -> Any:
        """The next slot, seen as `array`'s shape and dtype (its contents: not yet copied)."""
        self._next = (self._next + 1) % STAGING_SLOTS
        buffer, capacity = self._slots[self._next]
        if buffer is None or array.nbytes > capacity:
            capacity = max(array.nbytes, 2 * capacity, 1 << 16)
            buffer = self._empty(capacity)
            self._slots[self._next] = (buffer, capacity)
        return self._view(buffer, array.shape, str(array.dtype))

    def close(self) -> None:
        """Drop the buffers and the allocator (with whatever it closes over: a session)."""
        self._slots = []
        self._empty = self._view = None


class LocalExecutor:
    """The artifact's VM on one device, in this process."""

    single_caller = False

    def __init__(self, manifest: Manifest, device: str):
        self.device = open_device(device)
        self.devices = [self.device]
        load_externs(manifest)
        library = tvm.runtime.load_module(str(manifest.library_for(device_arch(self.device))))
        self.vm = tvm_vm.VirtualMachine(library, self.device)
        self._staging = Staging(
            lambda nbytes: tvm.runtime.empty((nbytes,), "uint8", self.device), self.view
        )

    def function(self, name: str) -> Callable[..., Any]:
        return self.vm[name]

    def builtin(self, name: str) -> Callable[..., Any]:
        return tvm_ffi.get_global_func(name)

    def upload(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        staged = self._staging.view(array)
        staged.copyfrom(array)
        return staged

    def item(self, value: Any, index: int) -> Any:
        return value[index]

    def view(self, tensor: Any, shape: Sequence[int], dtype: str) -> Any:
        return tensor._create_view(tuple(shape), dtype)

    def numpy(self, tensor: Any, shape: Sequence[int], dtype: str) -> np.ndarray:
        return tensor.numpy()

    def read(self, value: Any) -> Any:
        return value

    def load_params(self, manifest: Manifest) -> list[Any]:
        loaded: list[Any] = [None] * len(manifest.params)
        for index, (array,) in read_params(manifest):
            loaded[index] = tvm.runtime.tensor(array, self.device)
        return loaded

    def close(self) -> None:
        pass


def read_params(manifest: Manifest) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index into manifest.params, [rank 0's array, rank 1's, ...]) for every parameter,
    checked against the manifest; files are read one group at a time (memory maps)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, entry in enumerate(manifest.params):
        groups.setdefault(tuple(manifest.param_files(entry)), []).append(index)
    for files, indices in groups.items():
        shards = [load_safetensors(manifest.root / rel) for rel in files]
        for index in indices:
            p = manifest.params[index]
            arrays = []
            for rel, shard in zip(files, shards, strict=True):
                array = shard.get(p["name"])
                if array is None:
                    raise KilnError(
                        f"{rel} has no tensor {p['name']}, which the manifest puts there: "
                        "compile the artifact again"
                    )
                if list(array.shape) != p["shape"] or str(array.dtype) != p["dtype"]:
                    raise KilnError(
                        f"{rel}: tensor {p['name']} is {array.dtype}{list(array.shape)}, the "
                        f"manifest says {p['dtype']}{p['shape']}: compile the artifact again"
                    )
                arrays.append(array)
            yield index, arrays


def open_executor(
    manifest: Manifest,
    device: str,
    devices: Sequence[str] | None = None,
    session: Any = None,
) -> Executor:
    """The executor that runs `manifest` on `device`, or over `devices` (a tensor-parallel
    artifact's GPUs, by default cuda:0..N-1), or in the Disco `session` given (for tests:
    the session stays the caller's)."""
    if session is not None:
        from kiln.runtime.disco.executor import DiscoExecutor

        return DiscoExecutor(manifest, session)
    if device == "auto":
        device = manifest.device
    if devices is None:
        if manifest.tensor_parallel == 1:
            _check_kind(manifest, device)
            return LocalExecutor(manifest, device)
        devices = _default_devices(manifest, device)
    devices = _check_devices(manifest, devices)
    if len(devices) == 1:
        return LocalExecutor(manifest, devices[0])
    from kiln.runtime.disco.executor import DiscoExecutor
    from kiln.runtime.disco.nccl import nccl_session

    # The session shuts down when the last handle into it goes, also when this fails.
    return DiscoExecutor(
        manifest,
        nccl_session([parse_device(d)[1] for d in devices]),
        [open_device(d) for d in devices],
    )


def _check_kind(manifest: Manifest, device: str) -> None:
    kind, _ = parse_device(device)
    if kind != manifest.device:
        raise KilnError(
            f"{manifest.root} was compiled for {manifest.device}, not {kind}: "
            f"load it with device={manifest.device!r}, or compile it for a target that "
            f"runs on {kind} (see `kiln targets`)"
        )


def _check_tensor_parallel_runs(manifest: Manifest) -> None:
    """Kiln runs a tensor-parallel artifact on CUDA GPUs only (its NCCL backend)."""
    if manifest.device == "cpu":
        raise KilnError(
            f"{manifest.root} is a tensor-parallel build for the CPU "
            f"({manifest.tensor_parallel} ranks), which runs only in a Disco session given to "
            "it (Kiln's tests make one): compile it without --tensor-parallel to run it here"
        )
    if manifest.device != "cuda":
        raise KilnError(
            f"{manifest.root} is a tensor-parallel build for {manifest.device}; Kiln runs "
            "tensor parallelism on NVIDIA GPUs (NCCL) only: compile it for --target cuda, or "
            "without --tensor-parallel"
        )


def _default_devices(manifest: Manifest, device: str) -> list[str]:
    """cuda:0..N-1 for a tensor-parallel artifact loaded on "cuda", "cuda:0" or "auto"."""
    ranks = manifest.tensor_parallel
    _check_tensor_parallel_runs(manifest)
    _check_kind(manifest, device)
    if parse_device(device)[1] != 0:
        raise KilnError(
            f"{manifest.root} runs on {ranks} GPUs: name them with devices=[...] (or "
            f"--tensor-parallel {ranks} for cuda:0..{ranks - 1}), not device={device!r}"
        )
    return [f"cuda:{i}" for i in range(ranks)]


def _check_devices(manifest: Manifest, devices: Sequence[str]) -> list[str]:
    ranks = manifest.tensor_parallel
    devices = list(devices)
    parsed = [parse_device(d) for d in devices]  # an unknown name fails here
    if len(devices) != ranks:
        if ranks > 1:
            gpus = [f"cuda:{i}" for i in range(ranks)]
            fix = f"give {ranks} (devices={gpus}, or --tensor-parallel {ranks})"
        else:
            fix = "run it on one (device=..., no --tensor-parallel)"
        if len(devices) > 1:
            fix += f", or compile it with --tensor-parallel {len(devices)}"
        raise KilnError(
            f"{manifest.root} is compiled to run on {ranks} device{'s' if ranks > 1 else ''}, "
            f"but {len(devices)} {'was' if len(devices) == 1 else 'were'} given: {fix}"
        )
    if ranks == 1:
        _check_kind(manifest, devices[0])
        return devices
    _check_tensor_parallel_runs(manifest)
    for d in devices:
        _check_kind(manifest, d)
    for d, p in zip(devices, parsed, strict=True):
        if parsed.count(p) > 1:
            raise KilnError(f"devices names {d} twice: give each GPU once")
    present = device_count("cuda")
    missing = [d for d, (_, i) in zip(devices, parsed, strict=True) if i >= present]
    if missing:
        if present >= ranks:
            fix = f"name GPUs that exist (cuda:0..cuda:{present - 1})"
        else:
            fix = f"run it on a machine with {ranks} GPUs"
            if present > 1:
                fix += f", or compile it with --tensor-parallel {present}"
        raise KilnError(
            f"{manifest.root} runs on {ranks} GPUs ({', '.join(devices)}), but this machine "
            f"has {present or 'no'} GPU{'s' if present != 1 else ''} that TVM can use "
            f"({', '.join(missing)} missing): {fix}"
        )
    return devices
