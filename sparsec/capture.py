"""Capture: turn a model into one ATen-level FX graph that every pass understands.

Two entry points, one IR (``shared/ALGORITHMS.md``, "verified here"):

- dynamo backend: the dynamo graph is re-traced with ``make_fx(pre_dispatch=True)`` on
  dynamo's own fake inputs, which gives the same ATen ops ``torch.export`` produces
  (``aten.linear``, ``aten.silu``, ``aten.mul``) and keeps dynamic shapes symbolic. Parameters
  are graph inputs there; their names come from dynamo's sources.
- export: ``torch.export.export`` then ``ep.module()``; parameters are ``get_attr`` nodes.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from .passbase import GraphContext

__all__ = ["capture_dynamo", "capture_export", "source_to_fqn"]

_SEG = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def source_to_fqn(source: str) -> str | None:
    """``L['self']._modules['mlp']._parameters['weight']`` -> ``mlp.weight``.

    The root (``L['self']``, ``L['args'][0]``, ``L['fn']`` ...) is dropped: plans name sites
    relative to the model. ``None`` when the source is not an attribute chain of a module.
    """
    m = re.match(r"^L\[['\"]\w+['\"]\](\[\d+\])?", source)
    if not m:
        return None
    rest = source[m.end():]
    parts, pos = [], 0
    for mm in _SEG.finditer(rest):
        if mm.start() != pos:
            return None
        pos = mm.end()
        parts.append(next(g for g in mm.groups() if g is not None))
    if pos != len(rest) or not parts:
        return None
    return ".".join(parts)


def capture_dynamo(gm: fx.GraphModule, example_inputs) -> GraphContext:
    """ATen graph of a dynamo graph; placeholders keep dynamo's order (``example_inputs``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake = [n.meta.get("example_value") for n in placeholders]
    # Trace through an Interpreter under preserve_node_meta so every ATen node keeps the
    # nn_module_stack of the dynamo node it came from (make_fx alone drops it): sites are
    # named, and targets/ignore filtered, by the module that made the call.
    run = lambda *a: fx.Interpreter(gm).run(*a)  # noqa: E731
    with fx.traceback.preserve_node_meta():
        if any(v is None for v in fake):
            aten_gm = make_fx(run, pre_dispatch=True)(*example_inputs)
        else:
            symbolic = any(isinstance(v, torch.SymInt) for v in fake) or any(
                isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape) for v in fake
            )
            aten_gm = make_fx(run, pre_dispatch=True, tracing_mode="symbolic" if symbolic else "fake")(*fake)
    new_ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    params: dict[fx.Node, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for old, new, real in zip(placeholders, new_ph, example_inputs):
        arg = old.meta.get("grapharg")
        src = arg.source.name if arg is not None and hasattr(arg.source, "name") else None
        src = src() if callable(src) else src
        if not isinstance(real, torch.nn.Parameter) or src is None:
            continue
        fqn = source_to_fqn(src)
        if fqn is not None:
            params[new] = fqn
            tensors[fqn] = real
    return GraphContext(gm=aten_gm, params=params, origin="dynamo", tensors=tensors)


def capture_export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None):
    """``(ExportedProgram, GraphContext)``; the context is the program's own graph.

    Passes rewrite ``ep.graph_module`` in place (their ops take the same parameter inputs, so
    the graph signature stays valid) and ``ep.module()`` then runs the rewritten graph.
    """
    ep = torch.export.export(model, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    by_name = ep.graph_signature.inputs_to_parameters
    params = {n: by_name[n.name] for n in ep.graph_module.graph.nodes if n.op == "placeholder" and n.name in by_name}
    return ep, GraphContext(gm=ep.graph_module, params=params, origin="export", tensors=dict(ep.state_dict))
