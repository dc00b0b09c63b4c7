"""Lowering of ``sparsec::rsparse_linear`` (``sparsec_register_lowerings``): the op reads the
model's weight; at compile time it becomes ``sparsec::rsparse_linear_t`` on a transposed copy
(one contiguous row per input channel: the kernel streams only the rows of active inputs),
with the original weight beside it for the dense path (prefill)."""

from __future__ import annotations

import torch
import torch.fx as fx

from sparsec.codegen import Lowering, LoweringContext

__all__ = ["lower_rsparse_linear", "LOWERINGS"]


def lower_rsparse_linear(lctx: LoweringContext, nodes: list[fx.Node]) -> None:
    """``rsparse_linear(x, W, b, s, v, us, t)`` -> ``rsparse_linear_t(x, W^T, b, s, v, us, t, W)``.
    An op whose weight is not a known parameter stays as it is (it runs unprepared)."""
    graph = lctx.ctx.gm.graph
    for node in nodes:
        fqn, real = lctx.real_weight(node.args[1])
        if real is None:
            continue
        wt, _ = lctx.transposed([(fqn, real)], node)
        x, w, b, s, v, us, t = node.args
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.sparsec.rsparse_linear_t.default, (x, wt, b, s, v, us, t, w))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _use_triton_ops(gm: fx.GraphModule) -> int:
    """``Lowering.triton`` of ``rsparse_linear_t``: its CUDA nodes become its ``triton_op`` twin."""
    from sparsec.kernels.rsparse import triton as kernels  # registers the family's twin

    return kernels.use_triton_ops(gm) if kernels.available() else 0


LOWERINGS = {
    "sparsec::rsparse_linear": Lowering(prepare=lower_rsparse_linear),
    # the Triton templates add the residual in their store (rsparse_out), as the C++ kernel does
    "sparsec::rsparse_linear_t": Lowering(epilogue="residual", triton=_use_triton_ops),
}
