"""Rewrites of an exported program that the ONNX and MLIR exports share: ops whose weights
the plan holds compressed written with plain dense weights (``sparsec_register_dense_forms``),
and the program's constants kept consistent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .errors import ExportError
from .export import _lift_constants

__all__ = ["DenseForm", "densify", "has_dense_forms", "program_tensor"]


@dataclass
class DenseForm:
    weight: torch.Tensor  # the dense weight, zeros where the plan pruned
    build: Callable[[fx.Graph, fx.Node], fx.Node]  # the replacement call, given the weight's node
    encoding: str | None = None  # MLIR sparse_tensor encoding of the weight (structured N:M, ...)


def program_tensor(ep: torch.export.ExportedProgram, node: fx.Node) -> torch.Tensor:
    """The constant or state tensor behind a placeholder of the program."""
    for spec in ep.graph_signature.input_specs:
        if spec.arg.name == node.name:
            if spec.target in ep.constants:
                return ep.constants[spec.target]
            return ep.state_dict[spec.target]
    raise ExportError(f"sparsec export: {node.name!r} is not a constant of the program")


def has_dense_forms(ep: torch.export.ExportedProgram) -> bool:
    from .plugins import get_registry

    forms = get_registry().dense_forms()
    return any(getattr(n.target, "_schema", None) is not None and n.target._schema.name in forms
               for n in ep.graph.nodes if n.op == "call_function")


def densify(ep: torch.export.ExportedProgram) -> list[tuple[torch.Tensor, str | None]]:
    """Write every op that has a registered dense form with its dense weight; returns
    ``(weight, encoding)`` of each, in graph order. The compressed tensors those ops read
    become unused and leave the program."""
    from .plugins import get_registry

    forms = get_registry().dense_forms()
    gm, g = ep.graph_module, ep.graph_module.graph
    dense = []
    for node in list(g.nodes):
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        info = forms.get(schema.name) if schema is not None else None
        if info is None:
            continue
        form = info.fn(node, lambda arg: program_tensor(ep, arg))
        name = f"_sparsec_dense_{len(dense)}"
        gm.register_buffer(name, form.weight)
        with g.inserting_before(node):
            w = g.get_attr(name)
            w.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))  # names the lifted constant
            new = form.build(g, w)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        dense.append((form.weight, form.encoding))
    if not dense:
        return dense
    # the compressed tensors are now unused inputs: drop them from the program
    dead = {n.name for n in g.nodes if n.op == "placeholder" and not n.users}
    sig = ep.graph_signature
    for spec in list(sig.input_specs):
        if spec.arg.name in dead and spec.target in ep.constants:
            sig.input_specs.remove(spec)
            ep.constants.pop(spec.target)
            g.erase_node(next(n for n in g.nodes if n.name == spec.arg.name))
    gm.recompile()
    _lift_constants(ep)
    return dense
