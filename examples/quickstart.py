"""Compile the shipped tiny checkpoint for the CPU and use every part of the Python API.

    python examples/quickstart.py
"""

from pathlib import Path

import kiln

here = Path(__file__).resolve().parent
artifact = kiln.compile(here / "tiny-llama", target="cpu", quantization="q0f32",
                        output="build/tiny-llama")  # fmt: skip
m = kiln.load(artifact, device="cpu")

ids = m.tokenizer.encode("def fibonacci(n):")
print("logits:", m.prefill_logits(ids).shape)  # (len(ids), vocab), float32
print("ids:", m.generate_ids(ids, max_tokens=8, temperature=0))
print("text:", m.generate("def fibonacci(n):", max_tokens=16, temperature=0))
for piece in m.stream("import os\n", max_tokens=16, temperature=0.8, top_p=0.95, seed=0):
    print(piece, end="", flush=True)
print()
print("chat:", m.chat([{"role": "user", "content": "Write a function."}], max_tokens=16))
