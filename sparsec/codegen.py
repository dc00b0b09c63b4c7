"""Codegen: lower the passes' ops to kernels that read prepared weights.

The passes emit ops on the model's own weights (``sparsec::threshold_linear``,
``sparsec::cats_mlp``). Here, once per compile, each weight the kernels read row-wise is
copied transposed (``W^T``: one contiguous row per input channel) into a buffer of the
compiled graph module, and the op is swapped for its prepared twin
(``sparsec::sparse_linear``, ``sparsec::sparse_cats_mlp``). Those dispatch on device: C++ on
CPU tensors, generated Triton on CUDA tensors (``sparsec.kernels.triton_gen``), with the
plain-torch reference as the fallback.

Prepared weights are copies (about 0.8x the model's linear weights, more memory). The
compiled callable checks the weights' version counters on every call and re-copies a weight
that was changed in place (an optimizer step, ``load_state_dict``), so results are never
stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from .passbase import GraphContext

__all__ = ["Prepared", "lower", "RefreshingCallable"]

# op -> (prepared twin, index of the weight that is prepared transposed)
_LOWERINGS = {
    "threshold_linear": ("sparse_linear", 1),
    "cats_mlp": ("sparse_cats_mlp", 5),
}


@dataclass
class Prepared:
    """One prepared (transposed) copy of a model weight."""

    fqn: str
    param: torch.Tensor
    buffer: torch.Tensor
    version: int

    def refresh_if_stale(self) -> bool:
        if self.param._version == self.version:
            return False
        with torch.no_grad():
            self.buffer.copy_(self.param.detach().t())
        self.version = self.param._version
        return True


def _lowerable(op) -> tuple | None:
    if getattr(op, "namespace", None) != "sparsec":
        return None
    return _LOWERINGS.get(op._schema.name.split("::")[-1]) if hasattr(op, "_schema") else None


def lower(ctx: GraphContext) -> list[Prepared]:
    """Swap the passes' ops for their prepared twins in ``ctx.gm``; return the prepared weights.

    Needs real weights (``ctx.tensors``): the dynamo entry point has them. An op whose weight
    is not a known parameter is left as it is (it still runs, through the unprepared op).
    """
    gm, graph = ctx.gm, ctx.gm.graph
    made: dict[str, tuple[str, Prepared]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        low = _lowerable(node.target)
        if low is None:
            continue
        twin, idx = low
        w = node.args[idx]
        fqn = ctx.params.get(w) if isinstance(w, fx.Node) else None
        real = ctx.tensors.get(fqn) if fqn is not None else None
        if real is None or real.dim() != 2:
            continue
        if fqn not in made:
            attr = f"_sparsec_wt_{len(made)}"
            buf = real.detach().t().contiguous()
            gm.register_buffer(attr, buf)
            made[fqn] = (attr, Prepared(fqn, real, buf, real._version))
        attr = made[fqn][0]
        with graph.inserting_before(node):
            g = graph.get_attr(attr)
            g.meta["val"] = made[fqn][1].buffer
            args = list(node.args)
            args[idx] = g
            new = graph.call_function(getattr(torch.ops.sparsec, twin).default, tuple(args), dict(node.kwargs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if real.is_cuda:
            from sparsec.kernels import triton_gen

            triton_gen.prepare_site(twin, new, made[fqn][1].buffer)
    graph.lint()
    gm.recompile()
    return [p for _, p in made.values()]


class RefreshingCallable:
    """The compiled graph, re-copying prepared weights whose source changed in place."""

    def __init__(self, fn, prepared: list[Prepared]):
        self.fn = fn
        self.prepared = prepared

    def __call__(self, *args):
        for p in self.prepared:
            if p.param._version != p.version:
                p.refresh_if_stale()
        return self.fn(*args)
