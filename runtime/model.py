"""`kiln.load`: run a compiled artifact with only the TVM runtime.

The loop is deliberately small (gpt-fast style): prefill the prompt in chunks into the paged KV
cache, then decode one token at a time, sampling on the host.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import vm as tvm_vm

from kiln.runtime.artifact import Manifest, read_manifest
from kiln.runtime.device import open_device, parse_device
from kiln.runtime.errors import KilnError
from kiln.runtime.kv import PagedKV
from kiln.runtime.safetensors import load_safetensors
from kiln.runtime.sampler import SamplingParams, make_rng, sample
from kiln.runtime.tokenizer import Tokenizer

# The KV cache is sized for this many tokens unless the caller asks for more (up to the model's
# context): a 7B model's fp32 cache costs about 0.5 MB per token.
DEFAULT_CONTEXT = 4096


class Model:
    """A loaded artifact. Not thread-safe: one generation at a time (the engine batches)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        context_length: int | None = None,
        verify: bool = True,
    ):
        self.manifest: Manifest = read_manifest(path, verify=verify)
        kind, _ = parse_device(device)
        if kind != self.manifest.device:
            raise KilnError(
                f"{self.manifest.root} was compiled for {self.manifest.device}, not {kind}: "
                f"load it with device={self.manifest.device!r}, or compile it for a target that "
                f"runs on {kind} (see `kiln targets`)"
            )
        self.device = open_device(device)
        self.config = self.manifest.config
        self.vocab_size = int(self.config["vocab_size"])
        kv = self.manifest.kv_cache
        limit = int(kv["context_length"])
        self.context_length = min(context_length or min(limit, DEFAULT_CONTEXT), limit)
        window = kv.get("sliding_window")
        # Sliding-window attention is exact only for prefill chunks no longer than the window.
        self.prefill_chunk = min(int(kv["prefill_chunk_size"]), window or self.context_length)
        self.tokenizer = (
            Tokenizer.from_dir(self.manifest.root) if self.manifest.data.get("tokenizer") else None
        )

        library = tvm.runtime.load_module(str(self.manifest.library))
        self.vm = tvm_vm.VirtualMachine(library, self.device)
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        self.params = self._load_params()
        cache = self.vm["create_kv_cache"](
            tvm_ffi.Shape([1]),
            tvm_ffi.Shape([self.context_length]),
            tvm_ffi.Shape([self.prefill_chunk]),
            tvm_ffi.Shape([int(kv["page_size"])]),
        )
        self.kv = PagedKV(cache)
        self._seq_ids = itertools.count()

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

    # -- token ids -------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
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
                "shorten it, or load with a larger context_length (the model allows "
                f"{self.manifest.kv_cache['context_length']})"
            )
        return ids

    def _run_prefill(self, seq: int, ids: list[int], all_logits: bool) -> np.ndarray:
        """Feed `ids` into sequence `seq`; float32 logits of every position, or of the last."""
        outs = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = np.array(ids[start : start + self.prefill_chunk], dtype="int32")
            last = start + len(chunk) == len(ids)
            positions = (
                np.arange(len(chunk), dtype="int32")
                if all_logits
                else (np.array([len(chunk) - 1], dtype="int32"))
            )
            self.kv.begin([seq], [len(chunk)])
            logits, self.kv.cache = self._prefill(
                tvm.runtime.tensor(chunk[None], self.device),  # (1, n)
                tvm.runtime.tensor(positions, self.device),  # (k,)
                self.kv.cache,
                self.params,
            )
            self.kv.end()
            if all_logits or last:
                outs.append(logits.numpy()[0])  # (k, vocab)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def _run_decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token for each sequence -> float32 logits (batch, vocab)."""
        self.kv.begin(seqs, [1] * len(seqs))
        logits, self.kv.cache = self._decode(
            tvm.runtime.tensor(np.array(tokens, dtype="int32")[:, None], self.device),  # (b, 1)
            self.kv.cache,
            self.params,
        )
        self.kv.end()
        return logits.numpy()[:, 0]

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) at every position of `ids`."""
        ids = self._check_ids(ids)
        seq = next(self._seq_ids)
        self.kv.add(seq)
        try:
            return self._run_prefill(seq, ids, all_logits=True)
        finally:
            self.kv.remove(seq)

    def _tokens(self, ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Generated token ids, ending after a stop token (which is yielded), max_tokens, or
        the end of the context."""
        ids = self._check_ids(ids)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(self.eos_token_ids)
        rng = make_rng(params.seed)
        seq = next(self._seq_ids)
        self.kv.add(seq)
        try:
            logits = self._run_prefill(seq, ids, all_logits=False)
            length = len(ids)
            for _ in range(params.max_tokens):
                token = sample(logits, params, rng)
                yield token
                length += 1
                if token in stops or length >= self.context_length:
                    return
                logits = self._run_decode([seq], [token])[0]
        finally:
            self.kv.remove(seq)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return list(self.config.get("eos_token_id") or [])

    def generate_ids(self, ids: Sequence[int], **sampling: Any) -> list[int]:
        """Generate token ids after `ids` (a stop token, when hit, is the last id returned)."""
        return list(self._tokens(list(ids), SamplingParams(**sampling)))

    # -- text ------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise KilnError(
                f"{self.manifest.root} has no tokenizer: use prefill_logits/generate_ids with "
                "token ids, or recompile from a checkpoint that has tokenizer.json"
            )
        return self.tokenizer

    def _stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        tokenizer = self._require_tokenizer()
        text = tokenizer.text_stream(params.stop)
        eos = set() if params.ignore_eos else set(self.eos_token_ids)
        tokens = self._tokens(ids, params)
        try:
            for token in tokens:
                if token in eos or token in params.stop_token_ids:
                    break
                piece = text.put(token)
                if piece:
                    yield piece
                if text.stopped:
                    return
            rest = text.finish()
            if rest:
                yield rest
        finally:
            tokens.close()  # frees the sequence's KV pages at once, also on early exit

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the generated text piece by piece (never a broken UTF-8 character)."""
        params = SamplingParams(**sampling)
        return self._stream_ids(self._require_tokenizer().encode(prompt), params)

    def generate(self, prompt: str, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """Answer a conversation using the model's chat template."""
        tokenizer = self._require_tokenizer()
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template already wrote the special tokens (BOS included) as text.
        ids = tokenizer.encode(text, add_special_tokens=False)
        return "".join(self._stream_ids(ids, SamplingParams(**sampling)))


def load(path: str | Path, device: str = "cpu", **kwargs: Any) -> Model:
    return Model(path, device=device, **kwargs)
