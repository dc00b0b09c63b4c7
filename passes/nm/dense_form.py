"""``nm_linear`` written with a dense weight, for exports (``sparsec_register_dense_forms``)."""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def nm_linear_dense_form(node: fx.Node, tensor_of):
    """``nm_linear`` as a linear on its unpacked (masked, zero-filled) weight, for exports that
    need a plain weight (ONNX ``nm_format="dense"``; MLIR, with the ``structured[N, M]`` encoding)."""
    from sparsec.export_program import DenseForm
    from sparsec.kernels.nm import unpack
    from sparsec.mlir_export import nm_encoding

    x, values, positions, bias, n, m, threshold = node.args[:7]  # dense_copy: a CPU runtime choice
    vals, pos = tensor_of(values), tensor_of(positions)
    weight = unpack(vals, pos, n, m, vals.shape[1] // n * m)
    residual = node.kwargs.get("residual", node.args[8] if len(node.args) > 8 else None)

    def build(g: fx.Graph, w: fx.Node) -> fx.Node:
        if threshold >= 0:
            new = g.call_function(torch.ops.sparsec.threshold_linear.default, (x, w, bias, threshold))
        else:
            new = g.call_function(aten.linear.default, (x, w, bias))
        if residual is not None:  # the fused residual-add epilogue
            new.meta.update(node.meta)
            new = g.call_function(aten.add.Tensor, (new, residual))
        return new

    return DenseForm(weight=weight, build=build, encoding=nm_encoding(n, m))
