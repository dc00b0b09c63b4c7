"""The graph swap: prepared ops of CUDA nodes become their ``triton_op`` twins.

Inductor decomposes a ``triton_op`` into its body, so each generated kernel becomes a
user-defined Triton kernel in Inductor's own code (scheduled with the dense remainder, no
Python op call in between; AOTInductor can package it). Never used for CPU tensors: tracing
a Triton body needs a GPU driver (shared/ALGORITHMS.md, "verified here"). Which op has which
twin is what the families registered (``TritonOp.twin``); each family's lowering
(``sparsec.codegen.Lowering(triton=...)``) swaps its own ops.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .spec import registered, registered_ops

__all__ = ["use_triton_ops"]


def use_triton_ops(gm: torch.fx.GraphModule, ops: Iterable[str] | None = None) -> int:
    """Swap each prepared op whose output is on a CUDA device for its ``triton_op`` twin; returns
    how many. ``ops``: the op names to swap (default: every registered one). CPU nodes keep
    the C++ kernels."""
    table = registered_ops() if ops is None else {op: registered(op) for op in ops}
    swapped = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        op = schema.name.removeprefix("sparsec::") if schema is not None and schema.name.startswith("sparsec::") else ""
        entry = table.get(op)
        val = node.meta.get("val")
        if entry is None or not isinstance(val, torch.Tensor) or val.device.type != "cuda":
            continue
        if entry.twin_args is not None:  # the twin's schema differs from the op's
            node.args, node.kwargs = entry.twin_args(node)
        node.target = getattr(torch.ops.sparsec, entry.twin).default
        swapped += 1
    if swapped:
        gm.recompile()
    return swapped
