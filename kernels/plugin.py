"""The built-in kernels plugin: registers sparsec's own custom ops and their references."""

from __future__ import annotations

import torch

from sparsec.hookspecs import hookimpl

from . import activation, nm


@hookimpl
def sparsec_register_kernels(register):
    register(
        torch.ops.sparsec.threshold_linear.default,
        reference=activation.threshold_linear_reference,
        description="TEAL: W s_t(x) + b",
    )
    register(
        torch.ops.sparsec.cats_mlp.default,
        reference=activation.cats_mlp_reference,
        description="CATS: W_down (CATS_t(act(W_gate x)) * W_up x)",
    )
    register(
        torch.ops.sparsec.sparse_linear.default,
        reference=activation.sparse_linear_reference,
        description="TEAL on a prepared (transposed) weight; C++ / Triton kernels",
    )
    register(
        torch.ops.sparsec.sparse_cats_mlp.default,
        reference=activation.sparse_cats_mlp_reference,
        description="CATS on a prepared down weight; C++ / Triton kernels",
    )
    register(
        torch.ops.sparsec.nm_linear.default,
        reference=nm.nm_linear_reference,
        description="N:M compressed weights (values + packed positions), optional TEAL threshold",
    )


@hookimpl
def sparsec_register_onnx_translations(register):
    from . import onnx_translations

    for name, fn in onnx_translations.TRANSLATIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_decompositions(register):
    # ATen decompositions for MLIR export: thresholds become elementwise ops, linears one matmul
    from sparsec.mlir_export import linear_as_mm

    def threshold_linear(x, weight, bias, threshold):
        return linear_as_mm(activation.threshold_reference(x, threshold), weight, bias)

    def sparse_linear(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=()):
        y = linear_as_mm(activation.threshold_reference(x, threshold), weight_t.t(), bias)
        return activation.add_residual(y, residual, "sparse_linear")

    register(torch.ops.sparsec.threshold_linear.default, threshold_linear)
    register(torch.ops.sparsec.sparse_linear.default, sparse_linear)
    register(torch.ops.sparsec.cats_mlp.default, activation.cats_mlp_reference)
    register(torch.ops.sparsec.sparse_cats_mlp.default, activation.sparse_cats_mlp_reference)
