"""`kiln compile` / `kiln run` on user mistakes: one `error:` line on stderr, a non-zero exit and
no traceback; `kiln.compile` raises KilnError with the same message. Plus the happy paths that
share the machinery: recompiling over an artifact, a checkpoint without a tokenizer, and
`kiln run` printing what `kiln.load(...).generate` returns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from cli_contract import invoke, one_error

import kiln
from kiln.compiler.quantization import QUANTIZATIONS
from kiln.runtime.artifact import MANIFEST, read_manifest
from kiln.runtime.errors import KilnError
from kiln.targets import TARGETS

PROMPT = "def fibonacci(n):"


# -- running the CLI --------------------------------------------------------------------------


def kiln_cli(*args: object, cwd: Path) -> tuple[int, str, str]:
    """The real console: `python -m kiln.compiler.cli ARGS` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "KILN_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.compiler.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


def no_leftovers(out: Path) -> None:
    """Nothing but what was there before: no artifact, no staging folder."""
    assert not out.exists()
    assert not (out.parent / f".{out.name}.partial").exists()


# -- damaging a checkpoint --------------------------------------------------------------------


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        path = d / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    return damage


def edit_tensors(change: Callable[[dict[str, np.ndarray]], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        path = d / "model.safetensors"
        tensors = safetensors.numpy.load_file(path)
        change(tensors)
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})

    return damage


def unlink(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def truncate(d: Path) -> None:
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def not_json(d: Path) -> None:
    (d / "config.json").write_text("{not json")


def only_pickle(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def yarn_published(c: dict) -> None:
    # How published checkpoints spell it: top-level rope_theta + rope_scaling.
    c.pop("rope_parameters", None)
    c["rope_theta"] = 10000.0
    c["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


# The "llama" checkpoint: hidden 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 320.
COMPILE_ERRORS = {
    "no-config": (unlink("config.json"), ["no config.json"]),
    "config-not-json": (not_json, ["config.json", "not valid JSON"]),
    "unknown-architecture": (
        edit_config(lambda c: c.update(architectures=["GPT2LMHeadModel"])),
        ["GPT2LMHeadModel", "LlamaForCausalLM"],
    ),
    "hidden-act-gelu": (edit_config(lambda c: c.update(hidden_act="gelu")), ["hidden_act", "gelu"]),
    "rope-yarn": (edit_config(yarn_published), ["rope_scaling", "yarn"]),
    # transformers lets rope_scaling win over rope_parameters; so must Kiln, not ignore it.
    "rope-yarn-beside-rope-parameters": (
        edit_config(lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
        ["yarn"],
    ),
    "rope-yarn-in-rope-parameters": (
        edit_config(lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0})),
        ["yarn"],
    ),
    "missing-hidden-size": (edit_config(lambda c: c.pop("hidden_size")), ["'hidden_size'"]),
    "heads-not-multiple-of-kv-heads": (
        edit_config(lambda c: c.update(num_key_value_heads=3)),
        ["num_attention_heads (4)", "num_key_value_heads (3)"],
    ),
    "zero-heads": (edit_config(lambda c: c.update(num_attention_heads=0)), ["num_attention_heads"]),
    "no-safetensors": (unlink("model.safetensors"), ["no weights found", "safetensors"]),
    "only-pickle": (only_pickle, ["pytorch_model.bin", "pickle"]),
    "truncated-safetensors": (truncate, ["model.safetensors", "truncated"]),
    "missing-tensor": (
        edit_tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
        ["model.layers.1.mlp.down_proj.weight", "not found"],
    ),
    "wrong-shape": (
        edit_tensors(
            lambda t: t.update(
                {"model.layers.0.self_attn.o_proj.weight": np.zeros((64, 32), np.float32)}
            )
        ),
        ["model.layers.0.self_attn.o_proj.weight", "[64, 32]", "[64, 64]"],
    ),
    # q/k/v are stacked into one parameter: each part's shape is checked before codegen
    "wrong-shape-stacked": (
        edit_tensors(
            lambda t: t.update(
                {"model.layers.0.self_attn.q_proj.weight": np.zeros((72, 64), np.float32)}
            )
        ),
        ["model.layers.0.self_attn.q_proj.weight", "[72, 64]", "[64, 64]"],
    ),
    "extra-tensor": (
        edit_tensors(
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
        ),
        ["unexpected tensor model.layers.0.self_attn.q_proj.bias"],
    ),
}


@pytest.mark.parametrize("case", list(COMPILE_ERRORS))
def test_compile_checkpoint_errors(case, checkpoint, tmp_path):
    damage, needles = COMPILE_ERRORS[case]
    model = shutil.copytree(checkpoint("llama"), tmp_path / "model")
    damage(model)
    out = tmp_path / "out"
    one_error(*invoke("compile", model, "--output", out), *needles)
    no_leftovers(out)


def test_compile_bad_paths_and_options(checkpoint, tmp_path):
    model = checkpoint("llama")
    out = tmp_path / "out"
    one_error(
        *invoke("compile", model / "config.json", "-o", out),
        str(model / "config.json"),
        "is a file",
    )
    one_error(
        *invoke("compile", "no-such-org/no-such-model", "-o", out),
        "'no-such-org/no-such-model'",
        "hub",
    )
    line = one_error(*invoke("compile", model, "--target", "tpu", "-o", out), "'tpu'")
    assert all(name in line for name in TARGETS)
    line = one_error(*invoke("compile", model, "--quantization", "q3f7", "-o", out), "'q3f7'")
    assert all(name in line for name in QUANTIZATIONS)
    one_error(*invoke("compile", model, "--arch", "nonsense", "-o", out), "'nonsense'", "--arch")
    no_leftovers(out)

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    one_error(*invoke("compile", model, "-o", a_file), str(a_file))
    assert a_file.read_text() == "mine"

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    one_error(*invoke("compile", model, "-o", occupied), str(occupied), "not empty")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert (occupied / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / ".occupied.partial").exists()


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True}


def test_awq_preset_and_checkpoint_must_pair(checkpoint, tmp_path):
    """q4f16_awq needs an AutoAWQ checkpoint; an AutoAWQ checkpoint needs q4f16_awq."""
    model = checkpoint("llama")
    out = tmp_path / "out"
    one_error(
        *invoke("compile", model, "--quantization", "q4f16_awq", "-o", out),
        "--quantization q4f16_awq imports checkpoints quantized by AutoAWQ",
        f"{model} is not one",
        "e.g. q4f16",
    )
    awq = shutil.copytree(model, tmp_path / "awq")
    edit_config(lambda c: c.update(quantization_config=AWQ_CONFIG))(awq)
    for preset in ("q4f16", "q0f32"):
        one_error(
            *invoke("compile", awq, "--quantization", preset, "-o", out),
            f"{awq} holds AWQ-quantized weights",
            "compile it with --quantization q4f16_awq",
            f"quantize it with {preset}",
        )
    # The pairing is right, the tensors are not: the float weights are not AutoAWQ's.
    one_error(
        *invoke("compile", awq, "--quantization", "q4f16_awq", "-o", out),
        "model.layers.0.self_attn.q_proj.qweight",
        "not found",
    )
    edit_config(lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))(awq)
    one_error(*invoke("compile", awq, "-o", out), "quant_method 'gptq'", "cannot import")
    no_leftovers(out)


def test_compile_shows_conversion_progress_on_request(checkpoint, tmp_path):
    """--progress draws the conversion's progress: every checkpoint tensor and byte, on one
    line redrawn in place (without it, and stderr not a terminal, there is none: see
    test_recompile_replaces_artifact_and_warns_without_tokenizer)."""
    model = checkpoint("llama")
    tensors = safetensors.numpy.load_file(model / "model.safetensors")
    count, total = len(tensors), sum(a.nbytes for a in tensors.values())
    assert 1e3 < total < 1e6  # reported in kB
    code, _, err = invoke("compile", model, "--progress", "-o", tmp_path / "a")
    assert code == 0, err
    states = err.split("converting weights to q0f32\n", 1)[1].split("\n")[0].split("\r")[1:]
    assert (
        states[0].strip()
        == f"converting weights: 0/{count} tensors, 0 B/{total / 1e3:.2f} kB, ETA --:--"
    )
    assert states[-1].startswith(
        f"converting weights: {count}/{count} tensors, {total / 1e3:.2f} kB/{total / 1e3:.2f} kB, "
        "done in 0:0"
    )


def test_compile_errors_on_the_console(checkpoint, tmp_path):
    """The real process: exit status, stderr and the Python API's message agree."""
    missing = tmp_path / "nope"
    one_error(*kiln_cli("compile", missing, cwd=tmp_path), str(missing), "does not exist")

    model = shutil.copytree(checkpoint("llama"), tmp_path / "model")
    edit_config(lambda c: c.update(architectures=["GPT2LMHeadModel"]))(model)
    line = one_error(
        *kiln_cli("compile", model, "-o", tmp_path / "out", cwd=tmp_path), "GPT2LMHeadModel"
    )
    with pytest.raises(KilnError) as caught:
        kiln.compile(str(model), output=tmp_path / "out")
    assert line == f"error: {caught.value}"
    assert list(tmp_path.iterdir()) == [model]  # nothing written, not even in the cwd


def test_recompile_replaces_artifact_and_warns_without_tokenizer(checkpoint, artifact, tmp_path):
    out = shutil.copytree(artifact("llama"), tmp_path / "art")
    (out / "stale.txt").write_text("from an earlier build")
    code, stdout, err = kiln_cli("compile", checkpoint("llama"), "-o", out, cwd=tmp_path)
    assert code == 0, err
    assert "Traceback" not in stdout + err
    found = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(found) == 1 and "tokenizer" in found[0], err
    assert "converting weights:" not in err and "\r" not in err  # stderr is not a terminal
    assert not (out / "stale.txt").exists()  # replaced, not merged
    assert not (tmp_path / ".art.partial").exists()
    assert read_manifest(out).data["tokenizer"] is False

    code, stdout, err = kiln_cli("run", out, "--prompt", "hello", cwd=tmp_path)
    one_error(code, stdout, err, "no tokenizer", str(out))
    assert stdout == ""

    ids = kiln.load(out).generate_ids([1, 17, 42], max_tokens=4, temperature=0)
    assert 1 <= len(ids) <= 4 and all(0 <= t < 320 for t in ids)


def test_failed_compile_keeps_existing_artifact(checkpoint, artifact, tmp_path, monkeypatch):
    """A failure late in the compile (here: writing weights, after codegen) leaves the earlier
    artifact as it was and no staging folder behind."""
    import kiln.compiler.api as api

    def failing_convert(*args, **kwargs):
        out_dir = args[4]
        out_dir.mkdir(parents=True)
        (out_dir / "params-00001.safetensors").write_bytes(b"half")
        raise KilnError(f"no space left on the device writing {out_dir}: free some space")

    out = shutil.copytree(artifact("llama"), tmp_path / "art")  # built before the patch
    monkeypatch.setattr(api, "convert", failing_convert)
    before = (out / MANIFEST).read_bytes()
    code, stdout, err = invoke("compile", checkpoint("llama"), "-o", out)
    # Progress lines came first (the compile was under way); the error is still one line, last.
    *progress, last = err.splitlines()
    assert progress and not any("error" in line.lower() for line in progress), err
    one_error(code, stdout, last + "\n", "no space left")
    assert not (tmp_path / ".art.partial").exists()
    assert (out / MANIFEST).read_bytes() == before
    read_manifest(out)  # every file still matches its sha256


def test_run_prints_prompt_and_generation(artifact, tmp_path):
    art = artifact("tiny-llama")
    code, stdout, err = kiln_cli(
        "run", art, "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "0", cwd=tmp_path
    )
    assert code == 0, err
    assert "Traceback" not in err
    expected = kiln.load(art).generate(PROMPT, max_tokens=8, temperature=0)
    assert expected
    assert stdout == PROMPT + expected + "\n"
