"""Small tensor ops the model families share."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.core import wrap_nested


def take(x: nn.Tensor, indices: nn.Tensor, axis: int, name: str = "take") -> nn.Tensor:
    """`numpy.take` with out-of-range indices clamped. TVM's default "fast" mode reads out of
    bounds on a bad index (and warns about it at every compile); the runtime rejects bad token
    ids before they get here, so clamping costs nothing and removes the hazard."""
    return wrap_nested(relax.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name)


class Embedding(nn.Embedding):
    """The token table, through the two uses the models make of it. Quantization presets swap
    in a layer with the same two methods (kiln.compiler.quantization.layers)."""

    def lookup(self, ids: nn.Tensor) -> nn.Tensor:
        """ids (n,) int32 -> rows (n, dim)."""
        return take(self.weight, ids, 0, "embed")

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Tied LM head: x (..., dim) -> (..., num)."""
        return op.matmul(x, op.permute_dims(self.weight))
