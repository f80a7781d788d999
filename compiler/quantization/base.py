"""What every quantization preset provides, and how a model's parameters map onto its weights.

A preset acts on a model in two places (mlc-llm's design):

* `quantize_model(model)` runs after the model is built and before it is exported. Weight-only
  presets swap `nn.Linear` and Kiln's `Embedding` for layers whose parameters are the stored
  form of the weight (e.g. packed int4 + scales) and whose kernels dequantize as they compute.
  It returns a `ParamLayout`.
* `ParamLayout` is the bridge to weight conversion. A model family's weight map builds the
  *float* parameters of the unquantized model (`layout.sources`, e.g. `x.qkv_proj.weight`);
  `layout.transform(name, array)` turns one of them into the model parameters it becomes (e.g.
  `x.qkv_proj.qweight` and `x.qkv_proj.scale`). `layout.check` proves, before any compile work,
  that this covers the exported model's parameters exactly, with their shapes and dtypes.

A preset that imports a pre-quantized checkpoint (AWQ) has nothing to quantize: its schemes
also provide `import_sources`, and `ParamLayout.conversion` gives each stored tensor its own
`Source` of checkpoint tensors in place of the float parameter's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from kiln.compiler.quantization.layers import QuantizedEmbedding, QuantizedLinear
from kiln.compiler.weights import Source
from kiln.models.ops import Embedding
from kiln.runtime.errors import KilnError

Shape = tuple[int, ...]
Params = list[tuple[str, Shape, str]]  # (name, shape, dtype) in VM order, as export returns


def np_dtype(name: str) -> Any:
    """NumPy dtype for a TVM dtype name (bfloat16 comes from ml_dtypes, which TVM requires)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


class WeightScheme(Protocol):
    """How one 2-D float weight (rows = output features, cols = input features) is stored.

    The stored tensors are named by suffix: weight `x.weight` becomes `x.<suffix>` for each.
    """

    model_dtype: str

    def storage(self, rows: int, cols: int) -> dict[str, tuple[Shape, str]]:
        """suffix -> (shape, dtype) of each stored tensor."""
        ...

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (rows, cols) -> the stored tensors; deterministic NumPy."""
        ...

    def dequantize(self, stored: dict[str, np.ndarray], cols: int) -> np.ndarray:
        """The stored tensors -> (rows, cols) in `model_dtype`, bit for bit what the kernels use."""
        ...

    def weight_te(
        self,
        stored: dict[str, te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        dtype: str | None = None,
    ) -> tirx.PrimExpr:
        """Element (row, col) of the dequantized weight, read from `stored`: in `model_dtype`
        (dtype None), bit for bit what `dequantize` gives; or the same value computed in
        `dtype` without the rounding to `model_dtype` (the matmuls accumulate in float32 and
        take their weights so, which spares a conversion per weight)."""
        ...


class ImportScheme(WeightScheme, Protocol):
    """A scheme whose stored tensors a pre-quantized checkpoint already holds."""

    def import_sources(self, source: Source, shapes: tuple[Shape, ...]) -> dict[str, Source]:
        """suffix -> where that stored tensor comes from, given the float weight's `source`
        in a full-precision checkpoint and the (rows, cols) shape of each tensor it names."""
        ...


class Quantization(Protocol):
    """A named preset (a frozen dataclass in this package, registered in QUANTIZATIONS)."""

    name: str
    model_dtype: str  # activations, and the weights that stay in float
    description: str

    def quantize_model(self, model: nn.Module) -> ParamLayout: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ParamLayout:
    """Which model parameters each float parameter becomes.

    A float parameter that `schemes` does not name stays one parameter, cast to `dtype`.
    """

    dtype: str
    sources: dict[str, Shape]  # float parameter -> shape, in model order
    schemes: dict[str, WeightScheme]  # the float parameters stored quantized

    def outputs(self, name: str) -> dict[str, tuple[Shape, str]]:
        """Model parameter -> (shape, dtype), for what float parameter `name` becomes."""
        scheme = self.schemes.get(name)
        if scheme is None:
            return {name: (self.sources[name], self.dtype)}
        rows, cols = self.sources[name]
        return {_stored_name(name, k): v for k, v in scheme.storage(rows, cols).items()}

    @cached_property
    def imported(self) -> dict[str, tuple[Shape, str]]:
        """Model parameter -> (shape, dtype), for the stored tensors read from a pre-quantized
        checkpoint as they are."""
        return {
            k: v
            for name, scheme in self.schemes.items()
            if hasattr(scheme, "import_sources")
            for k, v in self.outputs(name).items()
        }

    def conversion(
        self, weight_map: dict[str, Source]
    ) -> tuple[dict[str, Shape], dict[str, Source]]:
        """The (parameters, weight map) that `weights.plan` and `weights.convert` work on.

        `weight_map` is the family's map of float parameters. A float parameter whose scheme
        imports stored tensors becomes those tensors, each with its own source.
        """
        params: dict[str, Shape] = {}
        sources = {k: v for k, v in weight_map.items() if k not in self.sources}
        for name, shape in self.sources.items():
            scheme, source = self.schemes.get(name), weight_map.get(name)
            if source is None or not hasattr(scheme, "import_sources"):
                params[name] = shape
                if source is not None:
                    sources[name] = source
                continue
            shapes = source.shapes if source.combine is not None else (shape,)
            if shapes is None:
                raise KilnError(f"bug in Kiln's weight map: {name} lacks shapes (please report)")
            for suffix, stored in scheme.import_sources(source, shapes).items():
                key = _stored_name(name, suffix)
                params[key] = self.imported[key][0]
                sources[key] = stored
        return params, sources

    def produces(self, name: str) -> dict[str, tuple[Shape, str]]:
        """What `transform(name, ...)` returns: model parameter -> (shape, dtype), for a
        parameter of `conversion` (`weights.convert` lays its shards out from this)."""
        if name in self.imported:
            return {name: self.imported[name]}
        return self.outputs(name)

    def transform(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        """float32 parameter -> {model parameter: array} (what `weights.convert` writes).

        An imported stored tensor arrives ready and passes through unchanged."""
        if name in self.imported:
            got = (tuple(array.shape), str(array.dtype))
            if got != self.imported[name]:
                raise KilnError(
                    f"bug in Kiln's quantization: imported {name} is {got}, the model expects "
                    f"{self.imported[name]} (please report this)"
                )
            return {name: array}
        scheme = self.schemes.get(name)
        if scheme is None:
            out = {name: array.astype(np_dtype(self.dtype))}
        else:
            out = {_stored_name(name, k): v for k, v in scheme.quantize(name, array).items()}
        got = {k: (tuple(v.shape), str(v.dtype)) for k, v in out.items()}
        if got != self.outputs(name):
            raise KilnError(
                f"bug in Kiln's quantization: parameter {name} converted to {got}, the model "
                f"expects {self.outputs(name)} (please report this)"
            )
        return out

    def check(self, params: Params) -> None:
        """Every exported parameter comes from exactly one float parameter, shape and dtype
        included, and nothing else is produced."""
        expected: dict[str, tuple[Shape, str]] = {}
        for source in self.sources:
            expected.update(self.outputs(source))
        exported = {name: (tuple(shape), dtype) for name, shape, dtype in params}
        if expected != exported:
            diff = sorted(
                f"{k}: model {exported.get(k)}, conversion {expected.get(k)}"
                for k in expected.keys() | exported.keys()
                if expected.get(k) != exported.get(k)
            )
            raise KilnError(
                f"bug in Kiln's quantization: the converted weights do not match the model's "
                f"parameters ({'; '.join(diff[:5])}) (please report this)"
            )


# Weights are quantized in blocks of rows of about this many values, so that the temporaries
# stay small next to the tensor itself (a Llama 3 embedding is 525M values).
BLOCK_VALUES = 1 << 22


def by_rows(
    quantize: Callable[[np.ndarray], dict[str, np.ndarray]], weight: np.ndarray
) -> dict[str, np.ndarray]:
    """Applies a row-wise `quantize` to blocks of rows of `weight` and joins the results."""
    step = max(1, BLOCK_VALUES // max(1, weight.shape[1]))
    parts = [quantize(weight[i : i + step]) for i in range(0, weight.shape[0], step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _stored_name(weight_name: str, suffix: str) -> str:
    return f"{weight_name.removesuffix('.weight')}.{suffix}"


def float_layout(model: nn.Module, dtype: str) -> ParamLayout:
    """The layout of a model whose parameters all stay in the float `dtype`."""
    sources = {name: tuple(int(d) for d in p.shape) for name, p in model.named_parameters()}
    return ParamLayout(dtype, sources, {})


def quantize_weights(
    model: nn.Module, scheme: WeightScheme, quantize_vocab: bool = True
) -> ParamLayout:
    """Swaps every `nn.Linear` and `Embedding` of `model` (in place) for layers that store their
    weight with `scheme`, and returns the resulting layout.

    Models name what stays in float: a module's `float_modules` attribute lists children never
    quantized (Mixtral's router); `vocab_modules` lists the embedding and LM head, which stay in
    float unless `quantize_vocab`.
    """
    sources = float_layout(model, scheme.model_dtype).sources
    schemes: dict[str, WeightScheme] = {}
    keep: set[str] = set()

    class Swap(nn.Mutator):
        def visit_module(self, name: str, node: nn.Module) -> Any:
            if name in keep:
                return node
            if isinstance(node, nn.Linear):
                if node.bias is not None or node.out_dtype is not None:
                    raise KilnError(f"bug in Kiln: quantized layers lack {name}'s bias/out_dtype")
                schemes[f"{name}.weight"] = scheme
                return QuantizedLinear(int(node.in_features), int(node.out_features), scheme)
            if isinstance(node, Embedding):
                schemes[f"{name}.weight"] = scheme
                return QuantizedEmbedding(int(node.num), int(node.dim), scheme)
            attrs = getattr(node, "float_modules", ())
            if not quantize_vocab:
                attrs = (*attrs, *getattr(node, "vocab_modules", ()))
            keep.update(f"{name}.{a}" if name else a for a in attrs)
            return self.visit(name, node)

    Swap().visit_module("", model)
    return ParamLayout(scheme.model_dtype, sources, schemes)


def preset_json(preset: Any, **scheme: Any) -> dict[str, Any]:
    """The manifest's "quantization" entry."""
    return {"name": preset.name, "model_dtype": preset.model_dtype, **scheme}
