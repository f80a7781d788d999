"""Layers whose weights stay in a quantization scheme's stored form, for every scheme.

Each kernel is ONE PrimFunc (`op.tensor_expr_op`) that reads the stored tensors directly: a
dequantize stage followed by the matmul (or the row gather) that consumes it. TVM's FuseOps
does not fuse a separate dequantize op into a matmul, and GPU schedules (dlight GEMV for
decode, Matmul for prefill) inline a dequantize stage found in the same PrimFunc.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from math import prod
from typing import TYPE_CHECKING

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

if TYPE_CHECKING:
    from kiln.compiler.quantization.base import WeightScheme

ACCUMULATE = "float32"  # matmuls accumulate in fp32 whatever the activation dtype


class _Stored(nn.Module):
    """Holds the scheme's stored tensors of a (rows, cols) weight as parameters."""

    def __init__(self, rows: int, cols: int, scheme: WeightScheme):
        self.rows, self.cols, self.scheme = rows, cols, scheme
        self._suffixes = tuple(scheme.storage(rows, cols))
        for suffix, (shape, dtype) in scheme.storage(rows, cols).items():
            setattr(self, suffix, nn.Parameter(shape, dtype))

    def _stored(self) -> list[nn.Tensor]:
        return [getattr(self, s) for s in self._suffixes]

    def _matmul(self, x: nn.Tensor, name: str) -> nn.Tensor:
        """x (..., cols) -> x @ W.T (..., rows), in the model dtype."""
        compute = linear_te(self.scheme, self.rows, self.cols)
        attrs = {LINEAR_ATTR: scheme_key(self.scheme)}
        return op.tensor_expr_op(compute, name, [x, *self._stored()], attrs=attrs)


# The attribute that marks a quantized Linear's kernel (its value: the scheme's key), so that
# kiln.passes.combine_parallel_matmul can rebuild it for several Linears' rows at once.
LINEAR_ATTR = "kiln.linear"

LinearTE = Callable[..., te.Tensor]  # (x, *stored tensors) -> x @ W.T
# (scheme key, rows, cols) -> the stored tensors' (shape, dtype) and the kernel's compute
LinearKernels = Callable[[str, int, int], tuple[list[tuple[tuple[int, ...], str]], LinearTE]]


# Every scheme a kernel was made for in this process, by key: passes that rebuild part of a
# kernel (kiln.passes.dispatch_matmul's dequantize before a GEMM library) find it from the key.
_SCHEMES: dict[str, WeightScheme] = {}


def scheme_key(scheme: WeightScheme) -> str:
    key = repr(scheme)  # schemes are frozen dataclasses: their repr names every setting
    _SCHEMES.setdefault(key, scheme)
    return key


def scheme_of(key: str) -> WeightScheme | None:
    """The scheme a kernel's LINEAR_ATTR names, if a kernel was made for it in this process."""
    return _SCHEMES.get(key)


def dequantize_te(scheme: WeightScheme, rows: int, cols: int) -> Callable[..., te.Tensor]:
    """The compute of a kernel that writes the (rows, cols) weight in the model dtype from its
    stored tensors: bit for bit the weight a Linear's kernel multiplies by in a GEMM."""
    suffixes = tuple(scheme.storage(rows, cols))

    def compute(*stored: te.Tensor) -> te.Tensor:
        tensors = dict(zip(suffixes, stored, strict=True))
        return te.compute(
            (rows, cols), lambda i, j: scheme.weight_te(tensors, i, j), name="dequantize"
        )

    return compute


def linear_kernels(schemes: Iterable[WeightScheme]) -> LinearKernels:
    """What the combine pass needs to rebuild the kernels of Linears stored with `schemes`."""
    by_key = {scheme_key(s): s for s in schemes}

    def make(key: str, rows: int, cols: int):
        scheme = by_key[key]
        return list(scheme.storage(rows, cols).values()), linear_te(scheme, rows, cols)

    return make


def linear_te(scheme: WeightScheme, rows: int, cols: int) -> LinearTE:
    """The compute of one kernel: dequantize the (rows, cols) weight, then x @ W.T."""
    suffixes = tuple(scheme.storage(rows, cols))
    dtype = scheme.model_dtype

    def compute(x: te.Tensor, *stored: te.Tensor) -> te.Tensor:
        tensors = dict(zip(suffixes, stored, strict=True))
        # A GEMV (a few static rows of x: the batch-1 decode) takes its weights in float32:
        # int4 values then reach float32 by an OR and a subtraction instead of a slow
        # integer-to-float16 conversion and a float16-to-float32 one (on an H100, dlight's
        # q4f16 GEMVs went from 34-55% to 40-65% of the memory bandwidth: bench/gemv.py).
        # A GEMM keeps them in the model dtype, which tensor cores take.
        lead = x.shape[:-1]
        gemv = all(isinstance(d, tirx.IntImm) for d in lead) and prod(map(int, lead)) <= 8
        w = te.compute(  # (rows, cols)
            (rows, cols),
            lambda i, j: scheme.weight_te(tensors, i, j, ACCUMULATE if gemv else None),
            name="dequantize",
        )
        k = te.reduce_axis((0, cols), name="k")
        out = te.compute(  # (..., rows)
            (*x.shape[:-1], rows),
            lambda *idx: te.sum(
                _cast(x[(*idx[:-1], k)], ACCUMULATE) * _cast(w[idx[-1], k], ACCUMULATE),
                axis=k,
            ),
            name="matmul",
        )
        if dtype == ACCUMULATE:
            return out
        return te.compute(out.shape, lambda *idx: out(*idx).astype(dtype), name="cast")

    return compute


class QuantizedLinear(_Stored):
    """`nn.Linear` without bias: x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme):
        super().__init__(out_features, in_features, scheme)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self._matmul(x, "dequantize_matmul")


class QuantizedEmbedding(_Stored):
    """`kiln.models.ops.Embedding`: a (num, dim) table; lookups dequantize only the rows read."""

    def __init__(self, num: int, dim: int, scheme: WeightScheme):
        super().__init__(num, dim, scheme)
        self.num, self.dim = num, dim

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        """ids (n,) int32 -> rows (n, dim); ids are clamped into the table like `ops.take`."""
        num, dim, scheme, suffixes = self.num, self.dim, self.scheme, self._suffixes

        def compute(ids: te.Tensor, *stored: te.Tensor) -> te.Tensor:
            tensors = dict(zip(suffixes, stored, strict=True))
            return te.compute(  # (n, dim)
                (ids.shape[0], dim),
                lambda t, j: scheme.weight_te(tensors, tirx.max(tirx.min(ids[t], num - 1), 0), j),
                name="dequantize_rows",
            )

        return op.tensor_expr_op(compute, "dequantize_take", [ids, *self._stored()])

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Tied LM head: x (..., dim) -> (..., num)."""
        return self._matmul(x, "dequantize_matmul")


def _cast(x: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    return x if x.dtype == dtype else x.astype(dtype)
