"""ONNX translation of ``nm_linear``: the weight is expanded from its compressed values and
packed positions by integer arithmetic and a one-hot product (``nm_expand``). Every input of
that expansion is an initializer, so onnxruntime folds it into a dense weight once, when the
session loads; the file keeps only the compressed bytes. Imported only when exporting."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from .._onnx import _ints, _linear, _plus, _static_dim, apply_threshold
from .ops import bits_for

__all__ = ["TRANSLATIONS", "nm_expand"]


def nm_expand(values, positions, n: int, m: int, in_features: int):
    """The dense ``[out, in]`` weight from ``kernels.nm.pack``'s format, in ONNX ops.

    positions: ``bits`` bits per kept value, little-endian in each byte, rows padded to 4
    bytes. Field i of a byte is ``(byte // 2^(i bits)) mod 2^bits`` (integer Div/Mod: ONNX's
    BitShift has no int64). Then a one-hot expansion, group by group:
    ``W[o, g, r] = sum_k values[o, g, k] * (pos[o, g, k] == r)``: exact (one product by 1, the
    rest by 0), and it needs no dense constant (a zeros tensor for ScatterElements would be
    folded into the file by the exporter's optimiser, undoing the compression).
    """
    bits = bits_for(m)
    per_byte = 8 // bits
    out_f, kept = _static_dim(values, 0), _static_dim(values, 1)
    if out_f is None or kept is None:
        raise ValueError("nm_linear: the compressed weight must have a static shape to export")
    groups = kept // n
    p = op.Unsqueeze(op.Cast(positions, to=ir.DataType.INT64), _ints([-1]))  # [out, bytes, 1]
    fields = op.Mod(op.Div(p, _ints([1 << (bits * i) for i in range(per_byte)])), _ints([1 << bits]))
    fields = op.Slice(op.Reshape(fields, _ints([out_f, -1])), _ints([0]), _ints([kept]), _ints([1]))
    fields = op.Reshape(fields, _ints([out_f, groups, n, 1]))
    onehot = op.CastLike(op.Equal(fields, _ints(list(range(m)))), values)  # [out, G, n, m]
    w = op.ReduceSum(op.Mul(op.Reshape(values, _ints([out_f, groups, n, 1])), onehot), _ints([2]), keepdims=0)
    return op.Reshape(w, _ints([out_f, groups * m]))


def nm_linear(x, values, positions, bias, n: int, m: int, threshold: float, dense_copy: bool = False,
              residual=None):
    # dense_copy picks a CPU path in torch; onnxruntime expands the weight once either way
    kept = _static_dim(values, 1)
    in_features = _static_dim(x, -1)
    if in_features is None:
        in_features = kept // n * m if kept is not None else None
    w = nm_expand(values, positions, n, m, in_features)
    xs = apply_threshold(x, threshold) if threshold >= 0 else x
    return _plus(_linear(xs, op.Transpose(w, perm=[1, 0]), bias), residual)



#: op name (in the sparsec namespace) -> translation
TRANSLATIONS = {"nm_linear": nm_linear}
