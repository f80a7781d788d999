"""q4f16_awq: AutoAWQ GEMM tensors, packed here by a NumPy transcription of AutoAWQ's own packing
loop, are imported losslessly (the dequantized weights equal (q - z) * s computed here from
the unpacked values, bit for bit), fused projections stack in the family's order, the kernels
decode the repacked layout exactly, and config.json is checked before anything is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from kiln.compiler.quantization import QUANTIZATIONS, for_checkpoint
from kiln.compiler.quantization.layers import QuantizedEmbedding, QuantizedLinear
from kiln.compiler.weights import Checkpoint, Source, convert, plan
from kiln.runtime.errors import KilnError

# AutoAWQ's order_map (WQLinear_GEMM.from_linear): nibble i of word w holds feature 8w + ORDER[i].
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GROUP = 16


def awq_pack(values: np.ndarray) -> np.ndarray:
    """(n, m) ints in 0..15 -> (n, m / 8) int32, AutoAWQ's loop transcribed."""
    n, m = values.shape
    packed = np.zeros((n, m // 8), np.uint32)
    for col in range(m // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return packed.view(np.int32)


def awq_layer(out_f: int, in_f: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random AWQ tensors of an (out_f, in_f) linear layer and its weight (out_f, in_f) fp16,
    w = (q - z) * s per AutoAWQ's dequantize_gemm."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (in_f, out_f))
    z = rng.integers(0, 16, (in_f // GROUP, out_f))
    s = (rng.uniform(0.5, 1.5, (in_f // GROUP, out_f)) * in_f**-0.5 / 6).astype(np.float16)
    zr, sr = np.repeat(z, GROUP, axis=0), np.repeat(s, GROUP, axis=0)
    w = ((q - zr).astype(np.float16) * sr).T  # (out_f, in_f)
    tensors = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}
    return tensors, np.ascontiguousarray(w)


def preset():
    return dataclasses.replace(QUANTIZATIONS["q4f16_awq"], group_size=GROUP)


def test_awq_order_on_one_word():
    """Feature k of a word is nibble ORDER.index(k): pack features 0..7 = values 1..8."""
    word = awq_pack(np.arange(1, 9)[None, :])
    assert hex(int(word.view(np.uint32)[0, 0])) == "0x86427531"
    from kiln.compiler.quantization.awq import unpack_awq

    assert unpack_awq(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_import_stacks_projections_losslessly(tmp_path: Path):
    """q/k/v AWQ layers -> one fused Kiln parameter set; dequantized = the stacked weights."""
    rows, cols = {"q": 32, "k": 16, "v": 16}, 48
    tensors, weights = {}, []
    for i, (p, r) in enumerate(rows.items()):
        layer, w = awq_layer(r, cols, seed=i)
        tensors.update({f"{p}_proj.{k}": v for k, v in layer.items()})
        weights.append(w)
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    float_source = Source(
        tuple(f"{p}_proj.weight" for p in rows),
        lambda a: np.concatenate(a, axis=0),
        tuple((r, cols) for r in rows.values()),
    )
    scheme = preset()
    layout = scheme.quantize_model(_Linear(cols, sum(rows.values()), "qkv"))
    params, wmap = layout.conversion({"qkv.weight": float_source})
    assert params == {"qkv.qweight": (64, 6), "qkv.zero": (64, 3), "qkv.scale": (64, 3)}
    assert wmap["qkv.zero"].names == ("q_proj.qzeros", "k_proj.qzeros", "v_proj.qzeros")
    out = tmp_path / "out"
    index = convert(
        Checkpoint(tmp_path), params, wmap, layout.transform, out, outputs=layout.produces
    )
    stored = safetensors.numpy.load_file(out / index["qkv.qweight"])
    assert {k: (v.dtype.name, v.shape) for k, v in stored.items()} == {
        "qkv.qweight": ("uint32", (64, 6)),
        "qkv.zero": ("uint8", (64, 3)),
        "qkv.scale": ("float16", (64, 3)),
    }
    deq = scheme.dequantize({k.split(".")[1]: v for k, v in stored.items()}, cols)
    want = np.concatenate(weights)
    assert deq.dtype == np.float16
    np.testing.assert_array_equal(deq.view(np.uint16), want.view(np.uint16))


class _Linear(nn.Module):
    def __init__(self, cols: int, rows: int, name: str):
        setattr(self, name, nn.Linear(cols, rows, bias=False))


class Probe(nn.Module):
    def __init__(self, scheme, rows: int, cols: int):
        self.table = QuantizedEmbedding(rows, cols, scheme)
        self.linear = QuantizedLinear(cols, rows, scheme)

    def rows(self, ids: nn.Tensor) -> nn.Tensor:
        return self.table.lookup(ids)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.linear(x)


def test_kernels_decode_the_repacked_layout():
    """The compiled row gather equals the NumPy dequantization bit for bit, and the matmul
    equals x @ W.T, W being AutoAWQ's (q - z) * s."""
    rows, cols = 24, 64
    layer, w = awq_layer(rows, cols, seed=5)
    scheme = preset()
    stored = {
        "qweight": _rows(layer, "qweight"),
        "zero": _rows(layer, "zero"),
        "scale": _rows(layer, "scale"),
    }
    np.testing.assert_array_equal(scheme.dequantize(stored, cols).view(np.uint16), w.view("u2"))
    mod, _ = Probe(scheme, rows, cols).export_tvm(
        spec={
            "rows": {"ids": nn.spec.Tensor(["n"], "int32")},
            "forward": {"x": nn.spec.Tensor(["n", cols], "float16")},
        }
    )
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    args = [tvm.runtime.tensor(stored[k]) for k in ("qweight", "zero", "scale")] * 2
    ids = np.arange(rows, dtype=np.int32)
    got = vm["rows"](tvm.runtime.tensor(ids), *args).numpy()
    np.testing.assert_array_equal(got.view(np.uint16), w.view(np.uint16))
    x = np.random.default_rng(0).standard_normal((5, cols)).astype(np.float16)
    got = vm["forward"](tvm.runtime.tensor(x), *args).numpy()
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def _rows(layer: dict[str, np.ndarray], suffix: str) -> np.ndarray:
    """One AWQ layer's tensor in Kiln's layout, through the preset's own import source."""
    sources = preset().import_sources(Source(("x.weight",)), ((24, 64),))
    awq_name = sources[suffix].names[0].split(".")[1]
    return sources[suffix].combine([layer[awq_name]])


AWQ_CONFIG = {
    "quant_method": "awq",
    "bits": 4,
    "group_size": 128,
    "zero_point": True,
    "version": "gemm",
    "modules_to_not_convert": None,
}


def test_checkpoint_config_pairs_with_the_preset():
    awq = QUANTIZATIONS["q4f16_awq"]
    cfg = {"architectures": ["LlamaForCausalLM"], "quantization_config": AWQ_CONFIG}
    bound, rest = for_checkpoint(awq, cfg, Path("m"))
    assert bound.group_size == 128 and "quantization_config" not in rest
    assert bound.to_json()["group_size"] == 128
    bound, _ = for_checkpoint(awq, {"quantization_config": {**AWQ_CONFIG, "group_size": 64}}, "m")
    assert bound.group_size == 64

    with pytest.raises(KilnError, match=r"q4f16_awq imports .* m is not one .* e\.g\. q4f16$"):
        for_checkpoint(awq, {"architectures": ["LlamaForCausalLM"]}, Path("m"))
    with pytest.raises(KilnError, match=r"AWQ-quantized .* --quantization q4f16_awq"):
        for_checkpoint(QUANTIZATIONS["q4f16"], cfg, Path("m"))
    with pytest.raises(KilnError, match=r"quant_method 'gptq'.* cannot import"):
        for_checkpoint(
            QUANTIZATIONS["q0f16"], {"quantization_config": {"quant_method": "gptq"}}, "m"
        )
    for bad, needle in [
        ({"version": "gemv"}, "version 'gemv'"),
        ({"bits": 8}, "8-bit"),
        ({"zero_point": False}, "zero_point false"),
        ({"group_size": -1}, "group_size -1"),
        ({"modules_to_not_convert": ["gate", "lm_head"]}, r"\['lm_head'\]"),
    ]:
        with pytest.raises(KilnError, match=needle):
            for_checkpoint(awq, {"quantization_config": {**AWQ_CONFIG, **bad}}, Path("m"))
    # Mixtral's router, which Kiln keeps in float anyway.
    for_checkpoint(
        awq, {"quantization_config": {**AWQ_CONFIG, "modules_to_not_convert": ["gate"]}}, "m"
    )


def test_checkpoint_tensors_are_checked_before_reading(tmp_path: Path):
    layer, _ = awq_layer(16, 32, seed=1)
    layer["qweight"] = layer["qweight"].astype(np.float32)  # wrong dtype
    safetensors.numpy.save_file({f"o.{k}": v for k, v in layer.items()}, tmp_path / "a.safetensors")
    layout = preset().quantize_model(_Linear(32, 16, "o"))
    params, wmap = layout.conversion({"o.weight": Source(("o.weight",))})
    with pytest.raises(KilnError, match=r"tensor o\.qweight in .* has dtype F32 but .* needs I32"):
        plan(Checkpoint(tmp_path), params, wmap)
    with pytest.raises(KilnError, match=r"group size 16 does not fit a 40-input"):
        preset().quantize_model(_Linear(40, 16, "o"))
