"""What a pass is, and the graph context every pass works on."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

__all__ = ["Pass", "GraphContext", "Site", "path_matches"]


@dataclass
class GraphContext:
    """An ATen-level FX graph plus what the passes need to know about it.

    ``params`` maps the graph nodes that are model parameters (dynamo placeholders, export
    ``get_attr`` nodes) to their fully qualified names (``model.layers.0.mlp.up_proj.weight``):
    passes match on graph structure and name sites by the module that owns the weight.
    """

    gm: fx.GraphModule
    params: dict[fx.Node, str]
    origin: str = "dynamo"  # "dynamo" | "export"
    #: real parameter tensors by FQN, where known (dynamo hands them over; export has them)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: weights the rewritten graph no longer reads because the plan holds their replacement
    #: (FQN -> what holds it): see ``pin_weight``
    pinned: dict[str, str] = field(default_factory=dict)

    def pin_weight(self, fqn: str, replaced_by: str) -> None:
        """Declare that the rewritten graph runs ``replaced_by`` (say, "the plan's N:M weights
        for model.layers.0.mlp.up_proj") instead of the model's weight ``fqn``.

        The compiled callable then refuses to run (a ``PlanError``) when it is called with a
        weight ``fqn`` that differs from the one compiled: another checkpoint that reuses the
        compiled code, or an in-place update. Without the pin it would silently keep running
        the replacement made from the old weight."""
        self.pinned[fqn] = replaced_by

    def param_name(self, node: Any) -> str | None:
        return self.params.get(node) if isinstance(node, fx.Node) else None

    @staticmethod
    def module_path(param_name: str) -> str:
        """``a.b.weight`` -> ``a.b``; other parameter names stay whole (``mlp.w1``)."""
        return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name

    @staticmethod
    def calling_module(node: fx.Node) -> str | None:
        """Path of the innermost module whose forward made this call (``nn_module_stack``)."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        return normalize_module_path(path)

    def site_path(self, call: fx.Node, weight: fx.Node) -> str:
        """Name of a site: the weight's owner, unless the call comes from another module
        (a tied weight: ``lm_head`` calls with ``model.embed_tokens.weight``)."""
        owner = self.module_path(self.params[weight])
        caller = self.calling_module(call)
        if caller is None or caller == "" or owner == caller or owner.startswith(caller + "."):
            return owner
        return caller

    @staticmethod
    def val(node: fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))

    def linear_args(self, node: fx.Node) -> tuple | None:
        """``(x, weight, bias)`` of a linear-like call whose weight is a 2-D parameter and whose
        bias, if any, is a parameter too; ``None`` otherwise."""
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if self.param_name(w) is None:
            return None
        v = self.val(w)
        if v is None or v.dim() != 2 or (b is not None and self.param_name(b) is None):
            return None
        return x, w, b


@dataclass
class Site:
    """One place a pass rewrites, named after the module that owns it."""

    key: str  # module path, e.g. "model.layers.0.mlp.up_proj"
    pass_name: str
    kind: str  # pass-specific, e.g. "teal" or "cats"
    nodes: dict[str, fx.Node]  # role -> node ("input", "linear", "weight", ...)
    weights: dict[str, str]  # role -> parameter FQN
    weight_shapes: dict[str, list[int]]
    weight_bytes: int
    group: str = ""  # sites that share one input share a group (one mask)
    block: str = ""  # the transformer block this site belongs to ("" = the whole model)


_ROOT_RE = re.compile(r"^L\[['\"]\w+['\"]\](\[\d+\])?\.?")


def normalize_module_path(path: str) -> str:
    """``L['self'].model.layers[0].mlp`` / ``model.layers.0.mlp`` -> ``model.layers.0.mlp``."""
    path = _ROOT_RE.sub("", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", "." + path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


_BLOCK_RE = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_of(path: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``; no numbered block -> ``""``."""
    m = _BLOCK_RE.match(path)
    return m.group(1) if m else ""


def path_matches(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """A module path matches a pattern if it is that path, lies below it, or fnmatches it
    (also as a suffix: ``lm_head`` and ``mlp.*`` match anywhere in the path)."""
    for pat in patterns:
        if path == pat or path.startswith(pat + ".") or path.endswith("." + pat):
            return True
        if fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path, "*." + pat):
            return True
        if ("." + pat + ".") in ("." + path + "."):
            return True
    return False


class Pass:
    """Base class for sparsec passes (subclassing is optional; the registry checks duck types).

    - ``name``: unique across all plugins; the key of the pass in a recipe's ``passes``.
    - ``after`` / ``before``: names of passes this one must run after / before.
    - ``config_cls``: a dataclass; recipes are validated against it (``sparsec.recipes``).
    - ``match(ctx, config) -> list[Site]``: find sites; must not modify the graph.
    - ``rewrite(ctx, sites, config, plan) -> bool``: rewrite them, return whether anything changed.
    - ``needs_calibration(config) -> bool`` and the calibration methods, if calibration decides
      something (thresholds, masks) that goes into the plan.
    """

    name: ClassVar[str] = ""
    #: "rewrite" (pure rewrites), or "state": the pass may emit ops that mutate declared cache
    #: inputs (``mutates_args``); state passes run after every other pass (passes/README.md)
    phase: ClassVar[str] = "rewrite"
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    #: passes whose sites may name the same weight as this pass's (their rewrites compose on one
    #: linear: N:M absorbs TEAL's threshold); any other two passes claiming one weight are an
    #: error naming both, before anything is rewritten (either side may declare it)
    shares_weights_with: ClassVar[tuple[str, ...]] = ()
    config_cls: ClassVar[type | None] = None

    def needs_calibration(self, config) -> bool:
        return False

    def match(self, ctx: GraphContext, config) -> list[Site]:
        return []

    def rewrite(self, ctx: GraphContext, sites: list[Site], config, plan) -> bool:
        return False

    def check_entry(self, key: str, entry: dict, tensors) -> None:
        """Check one plan entry this pass wrote (``entry["pass"] == self.name``) and the plan
        tensors it owns, against what ``rewrite`` and the kernels will read: types, ranges,
        tensor dtypes and shapes. Raise ``PlanError`` naming the site and the key in one line
        (``sparsec.plancheck`` has helpers); ``Plan.load`` and ``Plan.save`` call it for every
        entry, ``Plan.entry_for`` for in-memory plans. ``tensors``: all the plan's tensors, by
        name. The default checks nothing."""

    def report_row(self, key: str, entry: dict) -> dict | None:
        """The ``sparsec.report`` row of one of this pass's entries: ``kind``, ``target`` and
        ``measured`` sparsity, ``threshold`` (NaN if none), and the weight bytes a token reads
        densely and after the rewrite (``bytes_dense``, ``bytes_sparse``); ``None`` leaves the
        site out. The default reports the entry's ``weight_bytes`` unchanged."""
        from .report import default_row

        return default_row(key, entry)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
