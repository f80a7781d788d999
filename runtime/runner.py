"""A loaded artifact and its entry points: the forward passes the engine schedules.

`Runner` owns where the code runs (kiln.runtime.executor: one VM here, or a Disco session over
the GPUs of a tensor-parallel artifact), the weights, the tokenizer and one paged KV cache. It
knows nothing of requests: it runs one ragged prefill (chunks of several sequences) or one
batched decode (one token for each of several sequences; one sequence alone takes the
artifact's batch-1 specialization) and returns float32 logits, on the host or as `Logits` left
on the device, from which the artifact's sampling kernels take token ids without copying the
vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

from kiln.runtime.artifact import Manifest, read_manifest
from kiln.runtime.errors import KilnError
from kiln.runtime.executor import LocalExecutor, open_executor
from kiln.runtime.kv import PagedKV
from kiln.runtime.package import is_package, open_package
from kiln.runtime.step_graph import STEP_GRAPH_ENTRY, StepGraphs
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
    `devices`: the GPUs of a tensor-parallel artifact, one per rank (["cuda:0", "cuda:1"]);
    by default cuda:0..N-1 when `device` is "cuda", "cuda:0" or "auto". It then runs over a
    TVM Disco session (kiln.runtime.disco.executor), whose workers `close()` stops.
    `session`: for tests only, a Disco session to run in instead (the caller shuts it down).

    `context_length`: the longest sequence (prompt + generated) served, at most the model's.
    `max_batch_size`: the most sequences in one forward pass.
    `kv_tokens` / `kv_memory`: the KV cache's size in tokens or bytes (one of them); with
    tensor parallelism, bytes per GPU.
    `prefill_chunk`: the most tokens one prefill pass takes, all sequences together.
    `step_graphs`: run a lone sequence's decode steps as whole-step CUDA graphs
    (kiln.runtime.step_graph): None (the default) where they run; True needs them (one CUDA
    GPU, an artifact with that entry point, no sliding window) and says what is missing.

    Several sequences decode through the artifact's batch_graphs entry where it has one (CUDA,
    one GPU) and the batch is within its bound: Relax's CUDA graphs of the batched decode, one
    set per batch size, each captured on that size's first pass (`warm_batch_graphs` captures
    ahead); larger batches run the plain decode.
    """

    def __init__(
        self,
        path: str | Path | Manifest,
        device: str = "cpu",
        *,
        devices: Sequence[str] | None = None,
        session: Any = None,
        context_length: int | None = None,
        max_batch_size: int = 8,
        kv_tokens: int | None = None,
        kv_memory: int | None = None,
        prefill_chunk: int | None = None,
        step_graphs: bool | None = None,
        verify: bool = True,
    ):
        if isinstance(path, Manifest):  # a package's library, already checked (kiln.load)
            self.manifest = path
        elif is_package(path):
            self.manifest, device = open_package(path, device, verify=verify)
        else:
            self.manifest = read_manifest(path, verify=verify)
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise KilnError(f"max_batch_size is {max_batch_size!r}; it must be an integer >= 1")
        self.executor = open_executor(self.manifest, device, devices, session)
        try:
            self._open(context_length, max_batch_size, kv_tokens, kv_memory, prefill_chunk)
            self.step_graphs = self._open_step_graphs(step_graphs)
        except BaseException:
            self.executor.close()
            raise

    def _open(
        self,
        context_length: int | None,
        max_batch_size: int,
        kv_tokens: int | None,
        kv_memory: int | None,
        prefill_chunk: int | None,
    ) -> None:
        ex = self.executor
        self.device = ex.device  # worker 0's, with tensor parallelism
        self.vm = ex.vm
        self.tensor_parallel = self.manifest.tensor_parallel
        self.config = self.manifest.config
        self.vocab_size = int(self.config["vocab_size"])
        geometry = self.manifest.kv_cache
        self.page_size = int(geometry["page_size"])
        self.sliding_window: int | None = geometry.get("sliding_window")
        self.max_batch_size = max_batch_size
        self.tokenizer = (
            Tokenizer.from_dir(self.manifest.root) if self.manifest.data.get("tokenizer") else None
        )

        self._prefill = ex.function("prefill")
        self._decode = ex.function("decode")
        self._decode_1 = ex.function("decode_1")
        self.batch_graphs, self.batch_graph_max = self._open_batch_graphs()
        self._greedy = ex.function("sample_greedy")
        self._sample = ex.function("sample")
        self._upload = ex.upload
        # On a GPU the sampling kernels save copying (batch, vocab) floats to the host every
        # step; on the CPU the host's NumPy sampler is as fast and needs no sort.
        self.samples_on_device = self.manifest.device != "cpu"
        self.params = ex.load_params(self.manifest)

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
        cache = ex.function("create_kv_cache")(
            tvm_ffi.Shape([max_batch_size]),
            tvm_ffi.Shape([capacity]),
            # TVM sizes its staging buffers for this many tokens per pass: a decode of the
            # whole batch must fit too.
            tvm_ffi.Shape([max(self.prefill_chunk, max_batch_size)]),
            tvm_ffi.Shape([self.page_size]),
        )
        self.kv = PagedKV(cache, self.page_size, ex)
        self.model_seconds = 0.0  # time spent inside the compiled entry points

    def _open_step_graphs(self, wanted: bool | None) -> StepGraphs | None:
        if wanted is False:
            return None
        root = self.manifest.root
        fix = "leave out step_graphs"
        if self.manifest.device != "cuda" or not isinstance(self.executor, LocalExecutor):
            problem = (
                f"whole-step CUDA graphs run on one CUDA GPU, not {root} on "
                f"{self.manifest.device} with {len(self.executor.devices)} device(s)"
            )
        elif self.sliding_window:
            problem = f"{root} has sliding-window attention, which whole-step graphs cannot key yet"
        elif not self.vm.module.implements_function(STEP_GRAPH_ENTRY):
            problem = f"{root} has no {STEP_GRAPH_ENTRY} entry point (an older Kiln's artifact)"
            fix = f"compile it again, or {fix}"
        else:
            return StepGraphs(self)
        if wanted:
            raise KilnError(f"{problem}: {fix}")
        return None

    def _open_batch_graphs(self) -> tuple[Any, int]:
        """The artifact's copy of decode whose kernels Relax captures into CUDA graphs, one set
        per batch size (kiln.passes.step_graph_entry), and the most sequences it takes: (None,
        0) where it has none, or on several GPUs (not run there yet)."""
        entry = self.manifest.data.get("batch_graphs")
        if not entry or not isinstance(self.executor, LocalExecutor):
            return None, 0
        return self.executor.function(entry["entry"]), int(entry["max_batch"])

    def _decode_entry(self, rows: int) -> Any:
        if rows == 1:
            return self._decode_1
        if self.batch_graphs is not None and rows <= self.batch_graph_max:
            return self.batch_graphs
        return self._decode

    def warm_batch_graphs(self, seq_ids: Sequence[int]) -> None:
        """Capture the batched decode's graphs for len(seq_ids) sequences now rather than in a
        timed step: each of `seq_ids` (ids the cache does not hold) prefills a token, all
        decode one together, and they leave the cache."""
        if self.batch_graphs is None or not 1 < len(seq_ids) <= self.batch_graph_max:
            return
        for seq in seq_ids:
            self.kv.add(seq)
        try:
            self.prefill(seq_ids, [[1]] * len(seq_ids), on_device=True)
            self.decode(seq_ids, [1] * len(seq_ids), on_device=True)
        finally:
            for seq in seq_ids:
                self.kv.remove(seq)

    def _graph_pages(self, seq_ids: Sequence[int]) -> int | None:
        """The page count a whole-step graph of this begun pass is keyed by, or None where
        no graph takes it (several sequences; a forked one: kiln.runtime.step_graph)."""
        if self.step_graphs is None or len(seq_ids) != 1 or seq_ids[0] in self.kv.forked:
            return None
        return -(-self.kv.lengths[seq_ids[0]] // self.page_size)

    def close(self) -> None:
        """Stop the Disco workers of a tensor-parallel runner, which cannot run after; a local
        runner has nothing to stop, and goes on working."""
        if isinstance(self.executor, LocalExecutor):
            return
        # Every handle into the session goes, so that the session goes with the last one
        # (kiln.runtime.disco.executor says why not sooner).
        self.kv.close()
        self.params = self.vm = None
        self._prefill = self._decode = self._decode_1 = self._greedy = self._sample = None
        self.batch_graphs = None
        self.executor.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

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
        # With tensor parallelism, worker 0's GPU (in this process) speaks for all: every rank
        # holds as much, and asking another GPU from here would open a CUDA context on it.
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
        out = self._prefill(
            self._upload(ids[None]),  # (1, total)
            self._upload(positions),  # (k,)
            self.kv.cache,
            self.params,
        )  # (logits (1, k, vocab), the cache: updated in place)
        return self._finish_pass(out, len(positions), start, on_device)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int], on_device: bool = False) -> Any:
        """One token for each sequence -> float32 logits (batch, vocab), NumPy or `Logits`."""
        self.kv.begin(seq_ids, [1] * len(seq_ids))
        start = time.perf_counter()
        if (pages := self._graph_pages(seq_ids)) is not None:
            self.step_graphs.set_token(tokens[0])
            out, _ = self.step_graphs.step(pages, greedy=False)
        else:
            out = self._decode_entry(len(seq_ids))(
                self._upload(np.array(tokens, dtype="int32")[:, None]),  # (b, 1)
                self.kv.cache,
                self.params,
            )  # (logits (b, 1, vocab), the cache: updated in place)
        return self._finish_pass(out, len(seq_ids), start, on_device)

    def decode_greedy(
        self,
        seq_ids: Sequence[int],
        tokens: Sequence[int],
        steps: int,
        done: Callable[[list[int]], bool] | None = None,
        each: Callable[[list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Up to `steps` decode passes in a row, each fed the argmax of the one before where
        the pass left it (no upload, no sampling on the host): the greedy token ids (passes,
        batch). `done(tokens)`, given a pass's tokens, ends the run early when it returns
        True. `each(tokens)` gets every pass's tokens in order, once the pass after it is
        queued (the last's at the end), so that the caller's work on them overlaps the GPU's;
        it must leave the cache alone. The caller has checked that the cache holds `steps`
        more tokens of every sequence.

        Each pass ends before the next is queued: TVM's KV cache copies a pass's page tables
        into one device buffer on a stream of its own that does not wait for the passes queued
        before it, so a pass queued early overwrites the tables of the one still running
        (docs/TVM.md). The host reads each pass's tokens as it waits, and before that begins
        the next pass in the cache (host work only: the tables reach the device when the pass
        is queued), which a stop undoes."""
        rows = len(seq_ids)
        ex = self.executor
        entry = self._decode_entry(rows)
        graphs = self.step_graphs if self._graph_pages(seq_ids) is not None else None
        if graphs is None:
            ids = self._upload(np.array(tokens, dtype="int32")[:, None])  # (b, 1)
        else:
            graphs.set_token(tokens[0])  # each step leaves its argmax there for the next
        start = time.perf_counter()
        picked: list[list[int]] = []
        for step in range(steps):
            if step == 0:
                self.kv.begin(seq_ids, [1] * rows)  # later passes begin while the last runs
            if graphs is None:
                out = entry(ids, self.kv.cache, self.params)
                logits = ex.view(ex.item(out, 0), (rows, self.vocab_size), "float32")
                argmax = self._greedy(logits)  # (b,) int32
                ids = ex.view(argmax, (rows, 1), "int32")
            else:
                argmax = graphs.step(self._graph_pages(seq_ids), greedy=True)[1]
            self.kv.end()
            ahead = step + 1 < steps
            if ahead:
                self.kv.begin(seq_ids, [1] * rows)
            if each is not None and picked:
                each(picked[-1])  # while this pass runs (its time is the pass's)
            picked.append(ex.numpy(argmax, (rows,), "int32").tolist())
            if done is not None and done(picked[-1]):
                if ahead:
                    self.kv.undo_begin(seq_ids)
                break
        self.model_seconds += time.perf_counter() - start
        if each is not None and picked:
            each(picked[-1])
        return picked

    def _finish_pass(self, out: Any, rows: int, start: float, on_device: bool) -> Any:
        ex = self.executor
        shape = (rows, self.vocab_size)
        logits = Logits(self, ex.view(ex.item(out, 0), shape, "float32"), shape)
        result = logits if on_device else logits.numpy()
        self.model_seconds += time.perf_counter() - start
        self.kv.end()
        return result


class Logits:
    """One pass's float32 logits (rows, vocab), where the pass left them. Token ids come from
    the artifact's sampling kernels (kiln.compiler.sampling); `numpy()` copies them over once."""

    def __init__(self, runner: Runner, tensor: Any, shape: tuple[int, int] | None = None):
        self._runner = runner
        self.tensor = tensor  # a tensor of the runner's executor
        self.shape = shape or tuple(tensor.shape)
        self._host: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        if self._host is None:
            ex = self._runner.executor
            self._host = self._timed(ex.numpy, self.tensor, self.shape, "float32")
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
        return self._ids(self._runner._greedy)

    def _ids(self, kernel: Any, *args: Any) -> list[int]:
        """The (rows,) int32 token ids a sampling kernel picks, on the host."""
        ex = self._runner.executor
        return self._timed(
            lambda: ex.numpy(kernel(self.tensor, *args), self.shape[:1], "int32").tolist()
        )

    def sample(
        self,
        temperature: Sequence[float],
        top_p: Sequence[float],
        top_k: Sequence[int],
        uniform: Sequence[float],
    ) -> list[int]:
        """One token per row by the rules of kiln.runtime.sampler, drawn with `uniform[i]`
        in [0, 1); temperature must be > 0 (greedy rows use `greedy`)."""
        upload = self._runner.executor.upload
        args = [
            upload(np.asarray(values, dtype=dtype))
            for values, dtype in (
                (temperature, "float32"), (top_p, "float32"), (top_k, "int32"),
                (uniform, "float32"),
            )
        ]  # fmt: skip
        return self._ids(self._runner._sample, *args)
