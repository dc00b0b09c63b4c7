"""``aten.linear(x, W, b)`` whose weight (and bias) are model parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...passbase import GraphContext
from .common import NoMatch, is_call, val

__all__ = ["LinearMatch", "match_linear", "match_linears"]

aten = torch.ops.aten


@dataclass
class LinearMatch:
    node: fx.Node  # the aten.linear call
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    path: str  # the site's module path (the weight's owner, or the caller for a tied weight)
    weight_name: str  # the parameter's FQN
    bias_name: str | None

    @property
    def out_features(self) -> int:
        return int(val(self.weight).shape[0])

    @property
    def in_features(self) -> int:
        return int(val(self.weight).shape[1])

    @property
    def weight_bytes(self) -> int:
        v = val(self.weight)
        return int(v.numel()) * v.element_size()


def match_linear(ctx: GraphContext, node: fx.Node) -> LinearMatch | NoMatch | None:
    """A ``LinearMatch``, a ``NoMatch`` for a linear that cannot be a site (its weight is not a
    2-D parameter: a computed weight), or ``None`` for any other node."""
    if not is_call(node, aten.linear.default):
        return None
    parts = ctx.linear_args(node)
    if parts is None:
        return NoMatch(node, "its weight (or bias) is not a model parameter of two dimensions")
    x, w, b = parts
    return LinearMatch(node=node, input=x, weight=w, bias=b, path=ctx.site_path(node, w),
                       weight_name=ctx.param_name(w), bias_name=ctx.param_name(b) if b is not None else None)


def match_linears(ctx: GraphContext) -> tuple[list[LinearMatch], list[NoMatch]]:
    """Every linear of the graph, in graph order, and the linears that cannot be sites."""
    found, rejected = [], []
    for node in ctx.gm.graph.nodes:
        m = match_linear(ctx, node)
        if isinstance(m, LinearMatch):
            found.append(m)
        elif isinstance(m, NoMatch):
            rejected.append(m)
    return found, rejected
