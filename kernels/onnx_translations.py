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

# Deprecated module name: the translations live beside their families now
# (kernels/activation/onnx.py, kernels/nm/onnx.py; shared pieces in kernels/_onnx.py).
from ._onnx import apply_threshold
from .activation.onnx import TRANSLATIONS as _ACTIVATION
from .nm.onnx import TRANSLATIONS as _NM
from .nm.onnx import nm_expand

__all__ = ["TRANSLATIONS", "apply_threshold", "nm_expand"]

TRANSLATIONS = {**_ACTIVATION, **_NM}
