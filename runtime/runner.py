"""A loaded artifact and its entry points: the forward passes the engine schedules.

`Runner` owns the VM, the weights, the tokenizer and one paged KV cache. It knows nothing of
requests: it runs one ragged prefill (chunks of several sequences) or one batched decode
(one token for each of several sequences; one sequence alone takes the artifact's batch-1
specialization) and returns float32 logits, on the host or as `Logits` left on the device,
from which the artifact's sampling kernels take token ids without copying the vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import vm as tvm_vm

from kiln.runtime.artifact import Manifest, read_manifest
from kiln.runtime.device import device_arch, open_device, parse_device
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import load_externs
from kiln.runtime.kv import PagedKV
from kiln.runtime.package import is_package, open_package
from kiln.runtime.safetensors import load_safetensors
from kiln.runtime.tokenizer import Tokenizer

# Without kv_memory / kv_tokens the cache holds max_batch_size full contexts, but at most this
# many bytes on the CPU (a 7B model's fp32 cache costs about 0.5 MB per token) and at most
# this fraction of the GPU memory left free after the weights.
DEFAULT_CPU_KV_BYTES = 1 << 30
DEFAULT_GPU_KV_FRACTION = 0.8


class Runner:
    """An artifact (a directory, a .kiln package, or a package's checked `Manifest`) loaded
    for inference with a KV cache of the given geometry.

    `device`: "cpu", "cuda:1", ..., or "auto" (a package: the best device it serves here).

    `context_length`: the longest sequence (prompt + generated) served, at most the model's.
    `max_batch_size`: the most sequences in one forward pass.
    `kv_tokens` / `kv_memory`: the KV cache's size in tokens or bytes (one of them).
    `prefill_chunk`: the most tokens one prefill pass takes, all sequences together.
    """

    def __init__(
        self,
        path: str | Path | Manifest,
        device: str = "cpu",
        *,
        context_length: int | None = None,
        max_batch_size: int = 8,
        kv_tokens: int | None = None,
        kv_memory: int | None = None,
        prefill_chunk: int | None = None,
        verify: bool = True,
    ):
        if isinstance(path, Manifest):  # a package's library, already checked (kiln.load)
            self.manifest = path
        elif is_package(path):
            self.manifest, device = open_package(path, device, verify=verify)
        else:
            self.manifest = read_manifest(path, verify=verify)
        if device == "auto":
            device = self.manifest.device
        kind, _ = parse_device(device)
        if kind != self.manifest.device:
            raise KilnError(
                f"{self.manifest.root} was compiled for {self.manifest.device}, not {kind}: "
                f"load it with device={self.manifest.device!r}, or compile it for a target that "
                f"runs on {kind} (see `kiln targets`)"
            )
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise KilnError(f"max_batch_size is {max_batch_size!r}; it must be an integer >= 1")
        self.device = open_device(device)
        load_externs(self.manifest)
        self.config = self.manifest.config
        self.vocab_size = int(self.config["vocab_size"])
        geometry = self.manifest.kv_cache
        self.page_size = int(geometry["page_size"])
        self.sliding_window: int | None = geometry.get("sliding_window")
        self.max_batch_size = max_batch_size
        self.tokenizer = (
            Tokenizer.from_dir(self.manifest.root) if self.manifest.data.get("tokenizer") else None
        )

        library_path = self.manifest.library_for(device_arch(self.device))
        library = tvm.runtime.load_module(str(library_path))
        self.vm = tvm_vm.VirtualMachine(library, self.device)
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        self._decode_1 = self.vm["decode_1"]
        self._greedy = self.vm["sample_greedy"]
        self._sample = self.vm["sample"]
        # On a GPU the sampling kernels save copying (batch, vocab) floats to the host every
        # step; on the CPU the host's NumPy sampler is as fast and needs no sort.
        self.samples_on_device = self.manifest.device != "cpu"
        self.params = self._load_params()

        limit = int(geometry["context_length"])
        capacity = self._kv_capacity(kv_tokens, kv_memory, context_length or limit)
        # A request never outgrows the cache: alone, it always fits.
        self.context_length = min(context_length or limit, limit, capacity)
        self.prefill_chunk = max(
            1, min(prefill_chunk or int(geometry["prefill_chunk_size"]), capacity)
        )
        # Sliding-window attention is exact only while one sequence's prefill chunk is no longer
        # than the window (kiln.passes.lower_paged_kv_cache); other sequences share the pass.
        self.sequence_chunk = min(self.prefill_chunk, self.sliding_window or self.prefill_chunk)
        cache = self.vm["create_kv_cache"](
            tvm_ffi.Shape([max_batch_size]),
            tvm_ffi.Shape([capacity]),
            # TVM sizes its staging buffers for this many tokens per pass: a decode of the
            # whole batch must fit too.
            tvm_ffi.Shape([max(self.prefill_chunk, max_batch_size)]),
            tvm_ffi.Shape([self.page_size]),
        )
        self.kv = PagedKV(cache, self.page_size)
        self.model_seconds = 0.0  # time spent inside the compiled entry points

    # -- loading ---------------------------------------------------------------------------

    def _load_params(self) -> list[Any]:
        by_file: dict[str, list[dict[str, Any]]] = {}
        for p in self.manifest.params:
            by_file.setdefault(p["file"], []).append(p)
        loaded: dict[str, Any] = {}
        for rel, entries in by_file.items():
            arrays = load_safetensors(self.manifest.root / rel)
            for p in entries:
                array = arrays[p["name"]]
                if list(array.shape) != p["shape"] or str(array.dtype) != p["dtype"]:
                    raise KilnError(
                        f"{rel}: tensor {p['name']} is {array.dtype}{list(array.shape)}, the "
                        f"manifest says {p['dtype']}{p['shape']}: compile the artifact again"
                    )
                loaded[p["name"]] = tvm.runtime.tensor(array, self.device)
        return [loaded[p["name"]] for p in self.manifest.params]

    @property
    def kv_bytes_per_token(self) -> int:
        g = self.manifest.kv_cache
        itemsize = np.dtype(g["dtype"]).itemsize if g["dtype"] != "bfloat16" else 2
        return 2 * int(g["num_layers"]) * int(g["num_kv_heads"]) * int(g["head_dim"]) * itemsize

    def _kv_capacity(self, tokens: int | None, memory: int | None, context: int) -> int:
        """KV cache capacity in tokens, a whole number of pages."""
        if tokens is not None and memory is not None:
            raise KilnError("give kv_tokens or kv_memory, not both")
        for name, value in (("kv_tokens", tokens), ("kv_memory", memory)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise KilnError(f"{name} is {value!r}; it must be a positive integer")
        per_token = self.kv_bytes_per_token
        if tokens is not None:
            pages = -(-tokens // self.page_size)
        else:
            # Memory is a ceiling: round down.
            if memory is None:
                memory = min(self.max_batch_size * context * per_token, self._default_kv_bytes())
            tokens = memory // per_token
            pages = tokens // self.page_size
        if pages < 1:
            raise KilnError(
                f"the KV cache would hold {tokens} tokens, less than one page of "
                f"{self.page_size}: give a larger kv_memory or kv_tokens"
            )
        return pages * self.page_size

    def _default_kv_bytes(self) -> int:
        if self.manifest.device == "cpu":
            return DEFAULT_CPU_KV_BYTES
        free = self.device.available_global_memory or self.device.total_global_memory or 0
        return int(free * DEFAULT_GPU_KV_FRACTION)

    # -- token ids -------------------------------------------------------------------------

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise KilnError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise KilnError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if len(ids) > self.context_length:
            raise KilnError(
                f"the prompt has {len(ids)} tokens but the context holds {self.context_length}: "
                "shorten it, or load with a larger context_length or KV cache (the model allows "
                f"{self.manifest.kv_cache['context_length']})"
            )
        return ids

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return list(self.config.get("eos_token_id") or [])

    # -- forward passes --------------------------------------------------------------------

    def prefill(
        self,
        seq_ids: Sequence[int],
        chunks: Sequence[Sequence[int]],
        all_logits: bool = False,
        on_device: bool = False,
    ) -> Any:
        """Append `chunks[i]` to sequence `seq_ids[i]`, all in one pass. Returns float32 logits
        of each chunk's last token (len(chunks), vocab), or of every token (total, vocab): a
        NumPy array, or `Logits` on the device."""
        lengths = [len(c) for c in chunks]
        ids = np.fromiter((t for c in chunks for t in c), dtype="int32", count=sum(lengths))
        if all_logits:
            positions = np.arange(len(ids), dtype="int32")
        else:
            positions = (np.cumsum(lengths) - 1).astype("int32")
        self.kv.begin(seq_ids, lengths)
        start = time.perf_counter()
        logits, self.kv.cache = self._prefill(
            tvm.runtime.tensor(ids[None], self.device),  # (1, total)
            tvm.runtime.tensor(positions, self.device),  # (k,)
            self.kv.cache,
            self.params,
        )
        return self._finish_pass(logits, len(positions), start, on_device)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int], on_device: bool = False) -> Any:
        """One token for each sequence -> float32 logits (batch, vocab), NumPy or `Logits`."""
        self.kv.begin(seq_ids, [1] * len(seq_ids))
        start = time.perf_counter()
        entry = self._decode_1 if len(seq_ids) == 1 else self._decode
        logits, self.kv.cache = entry(
            tvm.runtime.tensor(np.array(tokens, dtype="int32")[:, None], self.device),  # (b, 1)
            self.kv.cache,
            self.params,
        )
        return self._finish_pass(logits, len(seq_ids), start, on_device)

    def _finish_pass(self, logits: Any, rows: int, start: float, on_device: bool) -> Any:
        out = Logits(self, logits._create_view((rows, self.vocab_size), logits.dtype))
        result = out if on_device else out.numpy()
        self.model_seconds += time.perf_counter() - start
        self.kv.end()
        return result


class Logits:
    """One pass's float32 logits (rows, vocab), where the pass left them. Token ids come from
    the artifact's sampling kernels (kiln.compiler.sampling); `numpy()` copies them over once."""

    def __init__(self, runner: Runner, tensor: Any):
        self._runner = runner
        self.tensor = tensor
        self._host: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def numpy(self) -> np.ndarray:
        if self._host is None:
            self._host = self._timed(self.tensor.numpy)
        return self._host

    def _timed(self, fn: Any, *args: Any) -> Any:
        # Device work is asynchronous: it is done (and counted as model time) when its result
        # reaches the host.
        start = time.perf_counter()
        out = fn(*args)
        self._runner.model_seconds += time.perf_counter() - start
        return out

    def greedy(self) -> list[int]:
        """Argmax of every row (the lowest id among ties)."""
        if not self._runner.samples_on_device:
            return np.argmax(self.numpy(), axis=-1).tolist()
        return self._timed(lambda: self._runner._greedy(self.tensor).numpy().tolist())

    def sample(
        self,
        temperature: Sequence[float],
        top_p: Sequence[float],
        top_k: Sequence[int],
        uniform: Sequence[float],
    ) -> list[int]:
        """One token per row by the rules of kiln.runtime.sampler, drawn with `uniform[i]`
        in [0, 1); temperature must be > 0 (greedy rows use `greedy`)."""
        dev = self._runner.device
        args = [
            tvm.runtime.tensor(np.asarray(values, dtype=dtype), dev)
            for values, dtype in (
                (temperature, "float32"), (top_p, "float32"), (top_k, "int32"),
                (uniform, "float32"),
            )
        ]  # fmt: skip
        return self._timed(lambda: self._runner._sample(self.tensor, *args).numpy().tolist())
