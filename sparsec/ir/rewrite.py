"""Graph edits every pass needs, done one way: replace a node, fuse linears that share an
input, add a constant tensor. Each keeps the invariants of ``passes/README.md`` (meta copied,
dead nodes erased only when unused)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..passbase import GraphContext

__all__ = ["replace", "add_constant", "fuse_horizontally"]


def replace(node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``node``, give it ``node``'s meta (its ``val``
    stays valid: the replacement computes a tensor of the same shape and dtype), move every
    use of ``node`` to it and erase ``node``."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, tuple(args), dict(kwargs or {}))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def add_constant(ctx: GraphContext, key: str, value: torch.Tensor, like: fx.Node | None = None) -> fx.Node:
    """A ``get_attr`` node for a tensor the pass owns (a plan tensor), registered as a buffer of
    the graph module under a name derived from ``key`` (``sparsec.export`` lifts it into the
    program's constants). Placed at the top of the graph; ``like`` lends its module stack,
    which torch.export's constant lifting reads."""
    gm = ctx.gm
    name = "_sparsec_" + "".join(c if c.isalnum() else "_" for c in key)
    if not hasattr(gm, name):
        device = next((t.device for t in ctx.tensors.values()), torch.device("cpu"))
        gm.register_buffer(name, value.to(device))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(name)
    node.meta["val"] = getattr(gm, name)
    node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {})) if like is not None else {}
    return node


def fuse_horizontally(members: Sequence[fx.Node], make: Callable[[Sequence[fx.Node]], fx.Node],
                      widths: Sequence[Any]) -> fx.Node:
    """Replace calls that read one input (q/k/v, gate/up) by one call whose output holds theirs
    side by side along the last dimension.

    ``make(members)`` builds the fused call (it is inserted before the first member, in graph
    order, where every input of every member is defined); ``widths`` are the members' output
    widths. Each member's uses move to a slice of the fused output; then the members are
    erased. A single member is replaced by the fused call directly.
    """
    members = sorted(members, key=_position)
    first = members[0]
    graph = first.graph
    with graph.inserting_before(first):
        fused = make(members)
    fused.meta.update(first.meta)
    col = 0
    for node, width in zip(members, widths):
        if len(members) == 1:
            out = fused
        else:
            with graph.inserting_before(first):
                out = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, col, col + width))
            out.meta.update(node.meta)
        col += width
        node.replace_all_uses_with(out)
    for node in members:  # only now: `first` anchored the insertions above
        graph.erase_node(node)
    return fused


def _position(node: fx.Node) -> int:
    for i, n in enumerate(node.graph.nodes):
        if n is node:
            return i
    raise ValueError(f"{node} is not in its graph")
