"""ONNX translations of sparsec's ops: each lowers to standard ONNX (opset 18) ops.

onnxruntime has no sparse kernels for these, so the translations keep tensors dense and
express the sparsity with ordinary ops (ALGORITHMS.md): a threshold is
``Where(|x| <= t, 0, x)`` (written that way round so a NaN input stays NaN, as in
``threshold_reference``), and an N:M weight is expanded from its compressed values and packed
positions by integer arithmetic and a one-hot product (``nm_expand``). Every input of that expansion is an
initializer, so onnxruntime folds it into a dense weight once, when the session loads; the
file keeps only the compressed bytes.

``torch.onnx.export`` traces these functions: tensor arguments arrive as ONNX values,
scalars (threshold, n, m, activation) as Python values, so plain Python ``if`` chooses
what to emit. Imported only when exporting (onnxscript is not needed to compile).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from .nm import bits_for

__all__ = ["TRANSLATIONS", "apply_threshold", "nm_expand"]


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


def _activation(a, name: str):
    if name == "silu":
        return op.Mul(a, op.Sigmoid(a))
    if name == "relu":
        return op.Relu(a)
    if name == "gelu":  # 0.5 a (1 + erf(a / sqrt 2))
        return op.Mul(op.Mul(_scalar(0.5, a), a), op.Add(_scalar(1.0, a), op.Erf(op.Div(a, _scalar(math.sqrt(2.0), a)))))
    if name == "gelu_tanh":  # 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))
        inner = op.Mul(_scalar(math.sqrt(2.0 / math.pi), a), op.Add(a, op.Mul(_scalar(0.044715, a), op.Mul(a, op.Mul(a, a)))))
        return op.Mul(op.Mul(_scalar(0.5, a), a), op.Add(_scalar(1.0, a), op.Tanh(inner)))
    raise ValueError(f"cats_mlp: no ONNX translation for activation {name!r}")


def threshold_linear(x, weight, bias, threshold: float):
    return _linear(apply_threshold(x, threshold), op.Transpose(weight, perm=[1, 0]), bias)


def _plus(y, residual):
    """The fused residual-add epilogue (same shape as the output: codegen fuses nothing else)."""
    return y if residual is None else op.Add(y, residual)


def sparse_linear(x, weight_t, bias, threshold: float, weight=None, residual=None, group_weights=None):
    # weight_t is the prepared [in, out] copy: MatMul takes it as it is
    return _plus(_linear(apply_threshold(x, threshold), weight_t, bias), residual)


def _cats(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation):
    a = _activation(_linear(x, op.Transpose(gate_weight, perm=[1, 0]), gate_bias), activation)
    h = op.Mul(apply_threshold(a, threshold), _linear(x, op.Transpose(up_weight, perm=[1, 0]), up_bias))
    return _linear(h, down_weight_t, down_bias)


def cats_mlp(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold: float, activation: str):
    return _cats(x, gate_weight, gate_bias, up_weight, up_bias, op.Transpose(down_weight, perm=[1, 0]),
                 down_bias, threshold, activation)


def sparse_cats_mlp(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold: float,
                    activation: str, residual=None, down_weight=None):
    return _plus(_cats(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation),
                 residual)


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


#: op name -> translation, registered by ``kernels/plugin.py``
TRANSLATIONS = {
    "threshold_linear": threshold_linear,
    "cats_mlp": cats_mlp,
    "sparse_linear": sparse_linear,
    "sparse_cats_mlp": sparse_cats_mlp,
    "nm_linear": nm_linear,
}
