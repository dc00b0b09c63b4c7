"""What every matcher shares: the rejection record and small node predicates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

__all__ = ["NoMatch", "is_call", "val", "bind_args"]


@dataclass(frozen=True)
class NoMatch:
    """A candidate a matcher looked at and rejected, and why (for notices and tests)."""

    node: fx.Node
    reason: str

    def __str__(self) -> str:
        return f"{self.node.name}: {self.reason}"


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any):
    """The example value (a FakeTensor) of a node, or ``None``."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def bind_args(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by schema name, defaults filled in (positional and keyword alike)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out
