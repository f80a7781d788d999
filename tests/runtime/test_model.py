"""kiln.load on the shipped tiny checkpoint: text generation, streaming, chat, stop strings,
and the runtime-only promise, against transformers on the same weights and tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

import kiln
from kiln.runtime.errors import KilnError

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def tiny(artifact):
    return kiln.load(artifact("tiny-llama"))


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint("tiny-llama"))


def hf_greedy(reference, checkpoint, ids: list[int], n: int) -> list[int]:
    ref = reference(checkpoint("tiny-llama"))
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def test_generate_text_equals_transformers(tiny, hf_tokenizer, reference, checkpoint):
    ids = hf_tokenizer(PROMPT)["input_ids"]
    assert tiny.tokenizer.encode(PROMPT) == ids
    expect = hf_greedy(reference, checkpoint, ids, 24)
    assert tiny.generate_ids(ids, max_tokens=24, temperature=0) == expect
    text = tiny.generate(PROMPT, max_tokens=24, temperature=0)
    assert text == hf_tokenizer.decode(expect, skip_special_tokens=True)


def test_stream_pieces_concatenate_to_generate(tiny):
    pieces = list(tiny.stream(PROMPT, max_tokens=40, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny.generate(PROMPT, max_tokens=40, temperature=0)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in "".join(pieces)


def test_stop_string_cuts_text(tiny):
    full = tiny.generate(PROMPT, max_tokens=40, temperature=0)
    stop = full[10:14]
    cut = tiny.generate(PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_chat_uses_template(tiny, hf_tokenizer, reference, checkpoint):
    messages = [{"role": "user", "content": "Write a function."}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expect = hf_greedy(reference, checkpoint, list(ids), 16)
    got = tiny.chat(messages, max_tokens=16, temperature=0)
    assert got == hf_tokenizer.decode(expect, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(tiny):
    a = tiny.generate_ids([1, 5, 9], max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    b = tiny.generate_ids([1, 5, 9], max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    c = tiny.generate_ids([1, 5, 9], max_tokens=20, temperature=0.9, top_p=0.9, seed=8)
    assert a == b
    assert a != c


def test_kv_pages_are_freed(tiny):
    free = tiny.kv.free_pages()
    tiny.generate(PROMPT, max_tokens=20, temperature=0)
    for _ in tiny.stream(PROMPT, max_tokens=50, temperature=0):
        break  # abandoning a stream must release its sequence too
    assert tiny.kv.free_pages() == free


def test_bad_requests(tiny):
    with pytest.raises(KilnError, match="empty"):
        tiny.generate_ids([], max_tokens=4)
    with pytest.raises(KilnError, match="outside the vocabulary"):
        tiny.generate_ids([1, 99999], max_tokens=4)
    with pytest.raises(KilnError, match="context"):
        tiny.prefill_logits([1] * (tiny.context_length + 1))
    with pytest.raises(KilnError, match="temperature"):
        tiny.generate(PROMPT, temperature=-1)


def test_runtime_only_subprocess(artifact, tiny):
    """An artifact loads and generates with the TVM runtime alone: no tvm.relax, no compiler."""
    path = artifact("tiny-llama")
    code = f"""
import json, sys
import kiln
m = kiln.load({str(path)!r})
ids = m.generate_ids([1, 528, 812], max_tokens=12, temperature=0)
text = m.generate({PROMPT!r}, max_tokens=12, temperature=0)
bad = sorted(k for k in sys.modules
             if k.startswith(("tvm.relax", "kiln.compiler", "kiln.models", "transformers")))
compiler_lib = "libtvm_compiler" in open("/proc/self/maps").read()
print(json.dumps({{"ids": ids, "text": text, "bad": bad, "compiler_lib": compiler_lib}}))
"""
    env = {"TVM_USE_RUNTIME_LIB": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bad"] == []
    assert not result["compiler_lib"]
    assert result["ids"] == tiny.generate_ids([1, 528, 812], max_tokens=12, temperature=0)
    assert result["text"] == tiny.generate(PROMPT, max_tokens=12, temperature=0)
