"""`kiln.load`: run a compiled artifact with only the TVM runtime.

A `Model` is a small `Engine` (kiln.runtime.engine) driven by its callers: `generate`,
`stream`, `generate_ids` and `chat` submit one request and read it to the end, so they share
the engine's scheduling, sampling and streaming. `prefill_logits` scores a prompt directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.runtime import package
from kiln.runtime.artifact import Manifest, read_manifest
from kiln.runtime.engine import Engine
from kiln.runtime.errors import KilnError
from kiln.runtime.sampler import SamplingParams
from kiln.runtime.tokenizer import Tokenizer

# The KV cache is sized for this many tokens unless the caller asks for more (up to the model's
# context): a 7B model's fp32 cache costs about 0.5 MB per token.
DEFAULT_CONTEXT = 4096
# Room for a few sequences in one pass (generate runs one; tests and scoring batch a few).
MAX_BATCH = 4


class Model:
    """A loaded artifact. Calls may come from several threads; they are then batched.

    `devices`: the GPUs of a tensor-parallel artifact (kiln.load(path, devices=["cuda:0",
    "cuda:1"]); by default cuda:0..N-1 for device "cuda"); `session`: a Disco session to run
    in, for tests. `close()` (or a `with` block) stops a tensor-parallel model's workers."""

    def __init__(
        self,
        path: str | Path | Manifest,
        device: str = "cpu",
        context_length: int | None = None,
        verify: bool = True,
        *,
        devices: Sequence[str] | None = None,
        session: Any = None,
    ):
        if isinstance(path, Manifest):
            geometry = path.kv_cache
        elif package.is_package(path):
            geometry = package.peek(path)["kv_cache"]
        else:
            geometry = read_manifest(path, verify=False).kv_cache
        limit = int(geometry["context_length"])
        context = min(context_length or min(limit, DEFAULT_CONTEXT), limit)
        # One context's worth of KV, and no prefix cache: a finished generation leaves no pages
        # behind.
        self.engine = Engine(
            path,
            device,
            devices=devices,
            session=session,
            max_batch_size=MAX_BATCH,
            kv_tokens=context,
            context_length=context,
            prefix_cache=False,
            verify=verify,
        )
        runner = self.engine.runner
        self.runner = runner
        self.manifest = runner.manifest
        self.device = runner.device
        self.config = runner.config
        self.vocab_size = runner.vocab_size
        self.context_length = runner.context_length
        self.prefill_chunk = runner.sequence_chunk
        self.tokenizer: Tokenizer | None = runner.tokenizer
        self.kv = runner.kv

    # The runner's, not copies: closing it must leave no handle into a Disco session behind.
    @property
    def vm(self) -> Any:
        return self.runner.vm

    @property
    def params(self) -> Any:
        return self.runner.params

    def close(self) -> None:
        """Cancel what still runs and release the devices (a tensor-parallel model's Disco
        workers exit)."""
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- token ids -------------------------------------------------------------------------

    def _run_prefill(self, seq: int, ids: list[int], all_logits: bool) -> np.ndarray:
        """Feed `ids` into sequence `seq`; float32 logits of every position, or of the last."""
        outs = []
        step = self.prefill_chunk
        for start in range(0, len(ids), step):
            outs.append(self.runner.prefill([seq], [ids[start : start + step]], all_logits))
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def _run_decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token for each sequence -> float32 logits (batch, vocab)."""
        return self.runner.decode(seqs, tokens)

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) at every position of `ids`."""
        ids = self.runner.check_ids(ids)
        with self.engine._lock:
            if self.kv.new_pages(0, len(ids)) > self.kv.free_pages():
                raise KilnError(
                    "the KV cache is held by unfinished generations: finish or close their "
                    "streams first, or load with a larger context_length"
                )
            seq = self.engine.new_seq_id()
            self.kv.add(seq)
            try:
                return self._run_prefill(seq, ids, all_logits=True)
            finally:
                self.kv.remove(seq)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.runner.eos_token_ids

    def generate_ids(self, ids: Sequence[int], **sampling: Any) -> list[int]:
        """Generate token ids after `ids` (a stop token, when hit, is the last id returned)."""
        return self.engine.submit(list(ids), SamplingParams(**sampling)).result().token_ids

    # -- text ------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise KilnError(
                f"{self.manifest.root} has no tokenizer: use prefill_logits/generate_ids with "
                "token ids, or recompile from a checkpoint that has tokenizer.json"
            )
        return self.tokenizer

    def _stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        handle = self.engine.submit(ids, params)
        try:
            yield from handle
        finally:
            handle.cancel()  # frees the sequence's KV pages at once, also on early exit

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the generated text piece by piece (never a broken UTF-8 character)."""
        params = SamplingParams(**sampling)
        return self._stream_ids(self._require_tokenizer().encode(prompt), params)

    def generate(self, prompt: str, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """Answer a conversation using the model's chat template."""
        ids = self._require_tokenizer().encode_chat(messages, add_generation_prompt=True)
        return "".join(self._stream_ids(ids, SamplingParams(**sampling)))


def load(path: str | Path, device: str = "cpu", **kwargs: Any) -> Model:
    return Model(path, device=device, **kwargs)
