"""Lowering of the activation-thresholding ops (``sparsec_register_lowerings``).

``sparsec::threshold_linear`` and ``sparsec::cats_mlp`` read the model's own weights; at
compile time they become their prepared twins ``sparsec::sparse_linear`` /
``sparsec::sparse_cats_mlp``, which read a transposed copy (one contiguous row per input
channel: the kernels stream only the rows of active inputs) and take the original weights
too, for their dense paths (prefill). They dispatch on device: C++ on CPU, generated Triton
on CUDA (``sparsec.kernels.activation.triton``), the plain-torch reference elsewhere.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from sparsec.codegen import Lowering, LoweringContext

__all__ = ["lower_threshold_linear", "lower_cats_mlp", "LOWERINGS"]


def _generate_triton(op: str, node: fx.Node, buffer: torch.Tensor) -> None:
    if buffer.is_cuda:
        from sparsec.kernels.activation.triton import prepare_site

        prepare_site(op, node, buffer)


def lower_threshold_linear(lctx: LoweringContext, nodes: list[fx.Node]) -> None:
    """``threshold_linear(x, W, b, t)`` -> ``sparse_linear(x, W^T, b, t, W)``.

    TEAL linears that read the same input with the same threshold and no bias (q/k/v, gate/up)
    are fused horizontally: one kernel call over their transposed weights side by side (each
    active input channel is then one longer contiguous row), its output sliced per linear.
    On SmolLM2 that is 4 calls per block instead of 7; small GEMVs are dominated by per-call
    costs. An op whose weight is not a known parameter stays as it is (it runs unprepared).
    """
    graph = lctx.ctx.gm.graph
    groups: dict[tuple, list] = defaultdict(list)
    for node in nodes:
        fqn, real = lctx.real_weight(node.args[1])
        if real is None:
            continue
        if node.args[2] is None:
            groups[(node.args[0], float(node.args[3]))].append((node, fqn, real))
            continue
        wt, prep = lctx.transposed([(fqn, real)], node)
        args = (*node.args[:1], wt, *node.args[2:], node.args[1])  # + the original weight (dense paths)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.sparsec.sparse_linear.default, args, dict(node.kwargs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _generate_triton("sparse_linear", new, prep.buffer)
    for (x, t), members in groups.items():
        first = members[0][0]  # members were collected in graph order
        wt, prep = lctx.transposed([(f, w) for _, f, w in members], first)
        with graph.inserting_before(first):
            # the original weights too, for the dense paths (prefill): a lone linear's, or each
            # member's (one GEMM per member: faster than one on the concatenated W^T)
            if len(members) == 1:
                fused = graph.call_function(torch.ops.sparsec.sparse_linear.default,
                                            (x, wt, None, t, members[0][0].args[1]))
            else:
                fused = graph.call_function(torch.ops.sparsec.sparse_linear.default, (x, wt, None, t),
                                            {"group_weights": [node.args[1] for node, _, _ in members]})
        fused.meta.update(first.meta)
        for (node, _, _), (_, _, c0, c1, _, _) in zip(members, prep.sources):
            if len(members) == 1:
                out = fused
            else:
                with graph.inserting_before(first):
                    out = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, c0, c1))
                out.meta.update(node.meta)
            node.replace_all_uses_with(out)
        for node, _, _ in members:  # only now: `first` anchors the insertions above
            graph.erase_node(node)
        _generate_triton("sparse_linear", fused, prep.buffer)


def lower_cats_mlp(lctx: LoweringContext, nodes: list[fx.Node]) -> None:
    """``cats_mlp(..., W_down, ...)`` -> ``sparse_cats_mlp(..., W_down^T, ..., down_weight=W_down)``."""
    graph = lctx.ctx.gm.graph
    for node in nodes:
        fqn, real = lctx.real_weight(node.args[5])
        if real is None:
            continue
        wt, prep = lctx.transposed([(fqn, real)], node)
        args = list(node.args)
        args[5] = wt
        kwargs = {**node.kwargs, "down_weight": node.args[5]}  # the original, for the dense paths
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.sparsec.sparse_cats_mlp.default, tuple(args), kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _generate_triton("sparse_cats_mlp", new, prep.buffer)


def _use_triton_ops(op: str):
    """``Lowering.triton`` of ``op``: its CUDA nodes become its ``triton_op`` twin."""

    def swap(gm: fx.GraphModule) -> int:
        from sparsec.kernels.activation import triton as kernels  # registers the family's twins

        return kernels.use_triton_ops(gm, (op,)) if kernels.available() else 0

    return swap


LOWERINGS = {
    "sparsec::threshold_linear": Lowering(prepare=lower_threshold_linear),
    "sparsec::cats_mlp": Lowering(prepare=lower_cats_mlp),
    # the prepared twins add a residual in their epilogue (the C++ kernels in place on their
    # fresh output, the Triton templates in the store: one launch fewer per o_proj / down_proj)
    "sparsec::sparse_linear": Lowering(epilogue="residual", triton=_use_triton_ops("sparse_linear")),
    "sparsec::sparse_cats_mlp": Lowering(epilogue="residual", triton=_use_triton_ops("sparse_cats_mlp")),
}
