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


_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]")
_PATH_TO_MODEL = re.compile(r"(?:\.[A-Za-z_]\w*|\[\d+\]|\[['\"][^'\"]*['\"]\])*")
_FIRST_LOOKUP = ("._modules[", "._parameters[", "._buffers[")


def source_to_fqn(source: str) -> str | None:
    """``L['self']._modules['mlp']._parameters['weight']`` -> ``mlp.weight``.

    The path to the model is dropped: plans name sites relative to the model, and the model is
    the object the first ``_modules`` / ``_parameters`` / ``_buffers`` lookup is made on. So a
    model that is ``self``, an argument (``L['args'][0]``), a closure variable (``L['m']``), a
    global (``G['model']``: a script's top-level ``model``) or an attribute of one
    (``G['box'].model``) all give the same names. ``None`` when the source is not an
    attribute chain of a module.
    """
    split = _split_source(source)
    return split[1] if split else None


def _split_source(source: str) -> tuple[str, str] | None:
    """``(path to the model, name in the model)`` of a parameter's dynamo source."""
    m = _ROOT.match(source)
    if not m:
        return None
    rest = source[m.end():]
    first = min((i for i in (rest.find(k) for k in _FIRST_LOOKUP) if i >= 0), default=-1)
    if first < 0 or not _PATH_TO_MODEL.fullmatch(rest[:first]):
        return None
    root, rest = source[: m.end() + first], rest[first:]
    parts, pos = [], 0
    for mm in _SEG.finditer(rest):
        if mm.start() != pos:
            return None
        pos = mm.end()
        parts.append(next(g for g in mm.groups() if g is not None))
    if pos != len(rest) or not parts:
        return None
    return root, ".".join(parts)


def _relative_module_stacks(gm: fx.GraphModule, roots: set[str]) -> None:
    """Drop the path to the model from every ``nn_module_stack`` entry (``G['model'].model.layers.0``
    -> ``model.layers.0``), as ``source_to_fqn`` does for weights, so sites are named the same
    whatever variable held the model. A fresh dict per node: dynamo's nodes share the old ones."""
    longest_first = sorted(roots, key=len, reverse=True)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        new = {}
        for key, (path, *more) in stack.items():
            for root in longest_first:
                if path == root or path.startswith(root + "."):
                    path = path[len(root) + 1:]
                    break
            new[key] = (path, *more)
        node.meta["nn_module_stack"] = new


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
    roots: set[str] = set()
    for old, new, real in zip(placeholders, new_ph, example_inputs):
        arg = old.meta.get("grapharg")
        src = arg.source.name if arg is not None and hasattr(arg.source, "name") else None
        src = src() if callable(src) else src
        if not isinstance(real, torch.nn.Parameter) or src is None:
            continue
        split = _split_source(src)
        if split is not None:
            roots.add(split[0])
            params[new] = split[1]
            tensors[split[1]] = real
    _relative_module_stacks(aten_gm, roots)
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
