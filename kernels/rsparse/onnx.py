"""ONNX translation of the R-Sparse ops (standard opset-18 ops): the mask ``!(|x| s <= t)`` as
``Where``, the sparse term one MatMul on the (transposed) weight, the low-rank term two thin
MatMuls on the complement. Imported only when exporting."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from .._onnx import _linear, _plus, _scalar

__all__ = ["TRANSLATIONS"]


def _split(x, scale, threshold: float):
    """``(x m, x (1 - m))``; the product and compare in fp32 for fp16/bf16 inputs, as the
    reference and the kernels make them (a NaN input stays in the sparse term)."""
    t = op.Constant(value=ir.tensor(np.asarray(threshold, dtype=np.float64)))
    dtype = getattr(x, "dtype", None)
    if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        score = op.Mul(op.Cast(op.Abs(x), to=ir.DataType.FLOAT), op.Cast(scale, to=ir.DataType.FLOAT))
        drop = op.LessOrEqual(score, op.Cast(t, to=ir.DataType.FLOAT))
    else:
        drop = op.LessOrEqual(op.Mul(op.Abs(x), op.CastLike(scale, x)), op.CastLike(t, x))
    zero = _scalar(0.0, x)
    return op.Where(drop, zero, x), op.Where(drop, x, zero)


def _rsparse(x, weight_t, bias, scale, v, us, threshold):
    xs, xc = _split(x, scale, threshold)
    return op.Add(_linear(xs, weight_t, bias), op.MatMul(op.MatMul(xc, v), us))


def rsparse_linear(x, weight, bias, scale, v, us, threshold: float):
    return _rsparse(x, op.Transpose(weight, perm=[1, 0]), bias, scale, v, us, threshold)


def rsparse_linear_t(x, weight_t, bias, scale, v, us, threshold: float, weight=None, residual=None):
    return _plus(_rsparse(x, weight_t, bias, scale, v, us, threshold), residual)


#: op name (in the sparsec namespace) -> translation
TRANSLATIONS = {"rsparse_linear": rsparse_linear, "rsparse_linear_t": rsparse_linear_t}
