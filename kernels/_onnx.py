"""ONNX building blocks the families' translations share (opset 18): constants, the
threshold ``Where``, a linear on a transposed weight, the residual add. Imported only when
exporting (onnxscript is not needed to compile)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

__all__ = ["apply_threshold", "linear", "plus", "static_dim", "scalar", "ints"]


def _scalar(value: float, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _ints(values) -> object:
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def apply_threshold(x, threshold: float):
    """``s_t(x) = x * 1[|x| > t]`` with NaN kept (``|NaN| <= t`` is false).

    The comparison is made exactly as ``threshold_reference`` makes it: in x's precision for
    fp32/fp64 (``t`` rounded from the double once, not via a float32 constant: in a float64
    export that would move the threshold by ~1e-8 and flip activations lying in between), in
    fp32 for fp16/bf16 (rounding ``t`` to bf16 would move it by up to 0.4%).
    """
    t = op.Constant(value=ir.tensor(np.asarray(threshold, dtype=np.float64)))
    dtype = getattr(x, "dtype", None)
    if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        mag = op.Cast(op.Abs(x), to=ir.DataType.FLOAT)
        drop = op.LessOrEqual(mag, op.Cast(t, to=ir.DataType.FLOAT))
    else:
        drop = op.LessOrEqual(op.Abs(x), op.CastLike(t, x))
    return op.Where(drop, _scalar(0.0, x), x)


def _linear(x, weight_t, bias):
    y = op.MatMul(x, weight_t)
    return y if bias is None else op.Add(y, bias)


def _static_dim(value, axis: int) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def _plus(y, residual):
    """The fused residual-add epilogue (same shape as the output: codegen fuses nothing else)."""
    return y if residual is None else op.Add(y, residual)



# the names the families' translations use
scalar, ints, linear, static_dim, plus = _scalar, _ints, _linear, _static_dim, _plus
