"""AutoAWQ checkpoints imported as published, never re-quantized (q4f16_awq).

An AutoAWQ "GEMM" checkpoint (config.json: `quantization_config` with quant_method "awq",
bits 4, zero_point true, version "gemm") stores each quantized linear layer `x` of
in_features I and out_features O as

* `x.qweight` int32 (I, O / 8): the 4-bit values q in 0..15, eight output features per word,
* `x.qzeros` int32 (I / G, O / 8): the zero points z in 0..15, packed the same way,
* `x.scales` fp16 (I / G, O): the scales s,

G being `group_size`; each group of G input features shares z and s. Within a word, bits
4i..4i+3 hold output feature 8w + AWQ_ORDER[i]. That order is AutoAWQ's (`order_map` in
`WQLinear_GEMM.from_linear`, awq/modules/linear/gemm.py; `AWQ_ORDER` / `AWQ_REVERSE_ORDER` in
awq/utils/packing_utils.py, which transformers' AWQ integration copies). The weight is
w = (q - z) * s in fp16 (AutoAWQ's `dequantize_gemm`). Embeddings, the LM head, norms and
Mixtral's router are not quantized by AWQ and stay fp16.

Kiln repacks these bits at conversion into its own row-major layout, losslessly (the same
q, z and s, so the same dequantized weights to the bit): a (rows = O, cols = I) weight is

* `qweight` (rows, cols / 8) uint32: q, feature j of a row in bits 4(j % 8).. of word j // 8
  (int4_group.py's packing, without its +8 offset),
* `zero` (rows, cols / G) uint8: z,
* `scale` (rows, cols / G) float16: s.

Row-major like the other presets, so every target's matmul schedules read each output row's
weights contiguously along the reduction, as they do for q4f16. Fused projections (q/k/v,
gate/up) are the AWQ layers' rows stacked by the family's own weight-map combine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from kiln.compiler.quantization.base import (
    ParamLayout,
    Shape,
    np_dtype,
    preset_json,
    quantize_weights,
)
from kiln.compiler.quantization.int4_group import (
    PER_WORD,
    nibble_te,
    nibble_value_te,
    pack_nibbles,
    unpack_nibbles,
)
from kiln.compiler.weights import Source
from kiln.runtime.errors import KilnError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output feature 8w + AWQ_ORDER[i] sits in nibble i
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(k) for k in range(PER_WORD))  # (0, 4, 1, 5, ...)
# Modules AutoAWQ leaves in float that Kiln keeps in float too (Mixtral's router).
FLOAT_MODULES = {"gate"}


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """(n, m / 8) AWQ-packed int32 -> (n, m) uint8 values 0..15 in natural feature order."""
    words = packed.view(np.uint32)
    shifts = np.arange(PER_WORD, dtype=np.uint32) * 4
    nibbles = (words[..., None] >> shifts) & np.uint32(0xF)  # (n, m / 8, 8), in nibble order
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1).astype(np.uint8)


def _qweight_rows(packed: np.ndarray) -> np.ndarray:
    """AWQ `qweight` (I, O / 8) -> Kiln `qweight` (O, I / 8)."""
    return pack_nibbles(unpack_awq(packed).T)


def _zero_rows(packed: np.ndarray) -> np.ndarray:
    """AWQ `qzeros` (I / G, O / 8) -> Kiln `zero` (O, I / G)."""
    return np.ascontiguousarray(unpack_awq(packed).T)


def _scale_rows(scales: np.ndarray) -> np.ndarray:
    """AWQ `scales` (I / G, O) -> Kiln `scale` (O, I / G)."""
    return np.ascontiguousarray(scales.T)


# Kiln suffix -> (AutoAWQ tensor suffix, its safetensors dtype, AWQ shape of an (O, I) weight
# with group G, conversion to Kiln's rows)
_TENSORS = {
    "qweight": ("qweight", "I32", lambda o, i, g: (i, o // PER_WORD), _qweight_rows),
    "zero": ("qzeros", "I32", lambda o, i, g: (i // g, o // PER_WORD), _zero_rows),
    "scale": ("scales", "F16", lambda o, i, g: (i // g, o), _scale_rows),
}


@dataclass(frozen=True)
class AWQInt4:
    name: str
    model_dtype: str  # activations, scales, and what stays in float
    description: str
    group_size: int = 128  # the registry's default; the checkpoint's config.json decides

    # -- the preset ----------------------------------------------------------------------------

    def quantize_model(self, model: nn.Module) -> ParamLayout:
        return quantize_weights(model, self, quantize_vocab=False)

    def to_json(self) -> dict[str, Any]:
        return preset_json(
            self,
            scheme="awq_int4",
            bits=4,
            group_size=self.group_size,
            zero_point=True,
            scale_dtype=self.model_dtype,
            quantize_vocab=False,
            imported_from="AutoAWQ gemm",
        )

    def for_checkpoint(self, hf_config: dict[str, Any], model_dir: Path) -> AWQInt4:
        """This preset with the checkpoint's group size, after checking that config.json
        describes an AutoAWQ GEMM checkpoint Kiln can import."""
        qc = hf_config.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "awq":
            raise KilnError(
                f"--quantization {self.name} imports checkpoints quantized by AutoAWQ, but "
                f"{model_dir} is not one (its config.json has no AWQ quantization_config): to "
                "quantize this full-precision checkpoint, choose another preset, e.g. q4f16"
            )
        where = f"{model_dir}/config.json: quantization_config"
        version = str(qc.get("version", "gemm")).lower()
        if qc.get("bits", qc.get("w_bit")) != 4 or version != "gemm":
            raise KilnError(
                f"{where} says {qc.get('bits', qc.get('w_bit'))}-bit AWQ version {version!r}; "
                "Kiln imports AutoAWQ's 4-bit GEMM format only (bits 4, version gemm): "
                "re-export the model with AutoAWQ's GEMM version"
            )
        if qc.get("zero_point", True) is not True:
            raise KilnError(f"{where}: zero_point false is not supported (AWQ GEMM uses zeros)")
        group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or group <= 0 or group % PER_WORD:
            raise KilnError(
                f"{where}: group_size {group!r} is not supported (a positive multiple of 8; "
                "-1, one group per row, is not)"
            )
        skipped = set(qc.get("modules_to_not_convert") or ()) - FLOAT_MODULES
        if skipped:
            raise KilnError(
                f"{where}: modules_to_not_convert {sorted(skipped)} leaves layers in float, "
                "which q4f16_awq does not support yet"
            )
        return dataclasses.replace(self, group_size=group)

    # -- the scheme ----------------------------------------------------------------------------

    def storage(self, rows: int, cols: int) -> dict[str, tuple[Shape, str]]:
        if cols % self.group_size or rows % PER_WORD:
            raise KilnError(
                f"AWQ group size {self.group_size} does not fit a {cols}-input, {rows}-output "
                "linear layer (inputs must be a multiple of the group size, outputs of 8): the "
                "checkpoint's quantization_config does not match its config.json"
            )
        groups = cols // self.group_size
        return {
            "qweight": ((rows, cols // PER_WORD), "uint32"),
            "zero": ((rows, groups), "uint8"),
            "scale": ((rows, groups), self.model_dtype),
        }

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        raise KilnError(
            f"bug in Kiln: {self.name} imports quantized weights but was asked to quantize "
            f"{name} (please report this)"
        )

    def import_sources(self, source: Source, shapes: tuple[Shape, ...]) -> dict[str, Source]:
        stems = []
        for t in source.names:
            if not t.endswith(".weight"):
                raise KilnError(f"bug in Kiln's weight map: {t} is not a .weight (please report)")
            stems.append(t.removesuffix(".weight"))
        stack = source.combine or (lambda arrays: arrays[0])
        out = {}
        for suffix, (awq_suffix, dtype, awq_shape, to_rows) in _TENSORS.items():

            def combine(arrays: list[np.ndarray], to_rows: Any = to_rows) -> np.ndarray:
                return np.asarray(stack([to_rows(a) for a in arrays]))

            out[suffix] = Source(
                tuple(f"{stem}.{awq_suffix}" for stem in stems),
                combine,
                tuple(awq_shape(o, i, self.group_size) for o, i in shapes),
                (dtype,) * len(stems),
            )
        return out

    def dequantize(self, stored: dict[str, np.ndarray], cols: int) -> np.ndarray:
        q = unpack_nibbles(stored["qweight"], cols).astype(np.int32)
        z = np.repeat(stored["zero"].astype(np.int32), self.group_size, axis=1)
        s = np.repeat(stored["scale"], self.group_size, axis=1)
        return (q - z).astype(np_dtype(self.model_dtype)) * s

    def weight_te(
        self,
        stored: dict[str, te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        dtype: str | None = None,
    ) -> tirx.PrimExpr:
        dtype = dtype or self.model_dtype
        group = col // self.group_size
        nibble = nibble_te(stored["qweight"], row, col)
        q = nibble_value_te(nibble, stored["zero"][row, group], dtype)
        return q * stored["scale"][row, group].astype(dtype)
