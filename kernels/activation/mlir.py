"""ATen decompositions of the activation ops, for ``sparsec.export_mlir``: thresholds become
elementwise ops, each linear one matmul on the transposed weight (``linear_as_mm``, the form
the export's sparse-encoding step finds)."""

from __future__ import annotations

from .._common import linear_as_mm
from .ops import add_residual, cats_mlp_reference, sparse_cats_mlp_reference, threshold_reference


def threshold_linear(x, weight, bias, threshold):
    return linear_as_mm(threshold_reference(x, threshold), weight, bias)


def sparse_linear(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=()):
    y = linear_as_mm(threshold_reference(x, threshold), weight_t.t(), bias)
    return add_residual(y, residual, "sparse_linear")


#: op name (in the sparsec namespace) -> decomposition
DECOMPOSITIONS = {
    "threshold_linear": threshold_linear,
    "sparse_linear": sparse_linear,
    "cats_mlp": cats_mlp_reference,
    "sparse_cats_mlp": sparse_cats_mlp_reference,
}
