"""The gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU, ReGLU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...passbase import GraphContext
from ..paths import common_prefix
from .common import NoMatch, is_call
from .linear import LinearMatch, match_linear

__all__ = ["GatedMLPMatch", "match_gated_mlps", "ACTIVATIONS"]

aten = torch.ops.aten

#: gate activation op -> its name (``gelu`` with ``approximate="tanh"`` is ``gelu_tanh``)
ACTIVATIONS = {aten.silu.default: "silu", aten.relu.default: "relu", aten.gelu.default: "gelu"}


@dataclass
class GatedMLPMatch:
    gate: LinearMatch
    up: LinearMatch
    down: LinearMatch
    act: fx.Node
    act_name: str
    mul: fx.Node
    path: str  # the MLP module that multiplies (``model.layers.0.mlp``)

    @property
    def input(self) -> fx.Node:
        return self.gate.input


def _act_name(node) -> str | None:
    if not is_call(node, *ACTIVATIONS):
        return None
    if node.target is aten.gelu.default and node.kwargs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    return ACTIVATIONS[node.target]


def match_gated_mlps(ctx: GraphContext) -> tuple[list[GatedMLPMatch], list[NoMatch]]:
    """Every gated MLP whose inner tensors have no other use (the fused op replaces them all)."""
    found, rejected = [], []
    for node in ctx.gm.graph.nodes:
        down = match_linear(ctx, node)
        if not isinstance(down, LinearMatch):
            continue
        h = down.input
        if not is_call(h, aten.mul.Tensor):
            continue
        why = None
        for act_node, up_node in (h.args, h.args[::-1]):
            act = _act_name(act_node)
            if act is None:
                continue
            gate, up = match_linear(ctx, act_node.args[0]), match_linear(ctx, up_node)
            if not (isinstance(gate, LinearMatch) and isinstance(up, LinearMatch)):
                why = "the gate or the up projection is not a linear on a parameter"
                continue
            if gate.input is not up.input:
                why = "gate and up read different inputs"
                continue
            if any(len(n.users) != 1 for n in (h, act_node, act_node.args[0], up_node)):
                why = "an inner tensor of the MLP has another use"
                continue
            path = ctx.calling_module(h) or common_prefix([gate.path, up.path, down.path]) or gate.path
            found.append(GatedMLPMatch(gate=gate, up=up, down=down, act=act_node, act_name=act, mul=h, path=path))
            why = None
            break
        if why is not None:
            rejected.append(NoMatch(node, why))
    return found, rejected
