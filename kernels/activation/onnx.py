"""ONNX translations of the activation-thresholding ops (standard opset-18 ops): a threshold is
``Where(|x| <= t, 0, x)`` (written that way round so a NaN input stays NaN, as in
``threshold_reference``); CATS thresholds the gate activation and multiplies densely. Imported
only when exporting."""

from __future__ import annotations

import math

from onnxscript import opset18 as op

from .._onnx import _linear, _plus, _scalar, apply_threshold

__all__ = ["TRANSLATIONS"]


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



#: op name (in the sparsec namespace) -> translation
TRANSLATIONS = {
    "threshold_linear": threshold_linear,
    "cats_mlp": cats_mlp,
    "sparse_linear": sparse_linear,
    "sparse_cats_mlp": sparse_cats_mlp,
}
