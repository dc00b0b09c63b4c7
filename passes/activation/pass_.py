"""The ``activation_threshold`` pass: TEAL and CATS sites, their calibration entries, the rewrite."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.fx as fx

from sparsec.errors import PlanError
from sparsec.ir.paths import common_prefix
from sparsec.passbase import GraphContext, Pass, Site, block_of, path_matches

from .allocation import greedy_allocation
from .config import ActivationThresholdConfig

__all__ = ["ActivationThreshold"]

aten = torch.ops.aten

# gate activation op -> name understood by sparsec::cats_mlp
_ACT_OPS = {
    aten.silu.default: "silu",
    aten.relu.default: "relu",
    aten.gelu.default: "gelu",  # "gelu_tanh" when approximate="tanh", see _act_name
}


def _act_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or node.target not in _ACT_OPS:
        return None
    if node.target is aten.gelu.default and node.kwargs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    return _ACT_OPS[node.target]


def _linear_parts(ctx: GraphContext, node: Any):
    """``(x, weight_node, bias_node)`` if ``node`` is a linear with a 2-D parameter weight."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not aten.linear.default:
        return None
    return ctx.linear_args(node)


def _shape(ctx, node) -> list[int]:
    return [int(s) for s in ctx.val(node).shape]


def _nbytes(ctx, node) -> int:
    v = ctx.val(node)
    return int(v.numel()) * v.element_size()


class ActivationThreshold(Pass):
    name = "activation_threshold"
    config_cls = ActivationThresholdConfig

    def needs_calibration(self, config: ActivationThresholdConfig) -> bool:
        return config.sparsity > 0

    # -- match ---------------------------------------------------------------------------------
    def _wanted(self, path: str, config) -> bool:
        if config.targets and not path_matches(path, config.targets):
            return False
        return not path_matches(path, config.ignore)

    def match(self, ctx: GraphContext, config: ActivationThresholdConfig) -> list[Site]:
        if config.sparsity == 0:
            return []  # nothing to threshold: the linears stay as they are
        return self._match_cats(ctx, config) if config.mode == "cats" else self._match_teal(ctx, config)

    def _match_teal(self, ctx, config) -> list[Site]:
        sites, groups = [], {}
        for node in ctx.gm.graph.nodes:
            parts = _linear_parts(ctx, node)
            if parts is None:
                continue
            x, w, b = parts
            path = ctx.site_path(node, w)
            if not self._wanted(path, config):
                continue
            group = groups.setdefault(x, path)  # first linear reading x names the group
            weights = {"weight": ctx.param_name(w)}
            shapes = {"weight": _shape(ctx, w)}
            if b is not None:
                weights["bias"] = ctx.param_name(b)
                shapes["bias"] = _shape(ctx, b)
            sites.append(
                Site(
                    key=path, pass_name=self.name, kind="teal",
                    nodes={"linear": node, "input": x, "weight": w, "bias": b},
                    weights=weights, weight_shapes=shapes, weight_bytes=_nbytes(ctx, w),
                    group=group, block=block_of(path),
                )
            )
        _check_unique(sites)
        return sites

    def _match_cats(self, ctx, config) -> list[Site]:
        sites = []
        for node in ctx.gm.graph.nodes:
            down = _linear_parts(ctx, node)
            if down is None:
                continue
            h = down[0]
            if not (isinstance(h, fx.Node) and h.op == "call_function" and h.target is aten.mul.Tensor and len(h.users) == 1):
                continue
            found = None
            for act_node, up_node in (h.args, h.args[::-1]):
                act = _act_name(act_node) if isinstance(act_node, fx.Node) else None
                if act is None or len(act_node.users) != 1:
                    continue
                gate = _linear_parts(ctx, act_node.args[0])
                up = _linear_parts(ctx, up_node)
                if gate is None or up is None or gate[0] is not up[0]:
                    continue
                if len(act_node.args[0].users) != 1 or len(up_node.users) != 1:
                    continue
                found = (act, act_node, gate, up, up_node)
                break
            if found is None:
                continue
            act, act_node, gate, up, up_node = found
            roles = {"gate": gate, "up": up, "down": down}
            weights, shapes, nbytes = {}, {}, 0
            for role, (_, w, b) in roles.items():
                weights[f"{role}_weight"] = ctx.param_name(w)
                shapes[f"{role}_weight"] = _shape(ctx, w)
                nbytes += _nbytes(ctx, w)
                if b is not None:
                    weights[f"{role}_bias"] = ctx.param_name(b)
                    shapes[f"{role}_bias"] = _shape(ctx, b)
            paths = [ctx.site_path(n, roles[r][1]) for r, n in (("gate", act_node.args[0]), ("up", up_node), ("down", node))]
            # the MLP module that multiplies (model.layers.0.mlp); the gate's path at the root
            key = ctx.calling_module(h) or common_prefix(paths) or paths[0]
            if not self._wanted(key, config) or not all(self._wanted(p, config) for p in paths):
                continue
            sites.append(
                Site(
                    key=key, pass_name=self.name, kind="cats",
                    nodes={"down": node, "act": act_node, "mul": h, "gate_linear": act_node.args[0],
                           "up_linear": up_node, "input": gate[0],
                           **{f"{r}_weight": roles[r][1] for r in roles}, **{f"{r}_bias": roles[r][2] for r in roles}},
                    weights=weights, weight_shapes=shapes, weight_bytes=nbytes,
                    group=key, block=block_of(key),
                )
            )
            sites[-1].activation = act  # type: ignore[attr-defined]
        _check_unique(sites)
        return sites

    # -- calibration ---------------------------------------------------------------------------
    def probes(self, ctx, sites: list[Site], config) -> dict[str, tuple[fx.Node, bool]]:
        """What to histogram: ``probe key -> (node, signed)``; one probe per shared input."""
        if config.mode == "cats":
            return {s.key: (s.nodes["act"], False) for s in sites}
        return {s.group: (s.nodes["input"], True) for s in sites}

    def plan_entries(
        self,
        sites: list[Site],
        config: ActivationThresholdConfig,
        hists: dict,
        greedy_scorer: Callable | None = None,
    ) -> dict[str, dict]:
        """Thresholds for every site, from the histograms (and the greedy search if asked)."""
        per_group: dict[str, float] = {}
        group_sites: dict[str, list[Site]] = defaultdict(list)
        for s in sites:
            group_sites[s.group].append(s)
        non_finite = [g for g in group_sites if g in hists and hists[g].n == 0 and hists[g].nan > 0]
        if non_finite:
            raise PlanError(f"every calibration value at {non_finite[:3]} is NaN or infinite ({hists[non_finite[0]].nan} "
                            "values): check the calibration batches and the model's weights")
        missing = [g for g in group_sites if g not in hists or hists[g].n == 0]
        if missing:
            how = "reached them empty (0 tokens?)" if all(g in hists for g in missing) else "never reached them"
            raise PlanError(f"calibration data {how}: sites {missing[:5]}; give batches with tokens, and check "
                            "that the calibrated call runs these sites (a data-dependent branch may skip them)")
        if config.mode == "teal" and config.allocation == "greedy":
            if greedy_scorer is None:
                warnings.warn(
                    "sparsec: greedy allocation has no scorer here (it needs sparsec.calibrate(model, ...) on "
                    "sites that are nn.Linear modules); using uniform allocation",
                    stacklevel=3,
                )
            else:
                per_group = greedy_allocation(sites, config, hists, greedy_scorer)
        entries = {}
        for g, members in group_sites.items():
            s_target = per_group.get(g, config.sparsity)
            t = hists[g].threshold(s_target)
            for s in members:
                entries[s.key] = {
                    "pass": self.name,
                    "kind": s.kind,
                    "threshold": float(t),
                    "sparsity": float(s_target),
                    "measured_sparsity": float(hists[g].measured_sparsity(t)) if s_target > 0 else 0.0,
                    "group": g,
                    "block": s.block,
                    "weights": s.weights,
                    "weight_shapes": s.weight_shapes,
                    "weight_bytes": s.weight_bytes,
                    **({"activation": s.activation} if s.kind == "cats" else {}),
                }
        return entries

    def held_out_batches(self, config: ActivationThresholdConfig) -> int:
        """Calibration batches to keep out of the histograms, to score the greedy steps on."""
        return config.greedy_batches if config.allocation == "greedy" else 0

    def scorer_transform(self, config: ActivationThresholdConfig):
        """How a site's value acts on its input when ``sparsec.calibrate`` scores a choice on
        the model (TEAL's greedy allocation); ``None``: this config scores nothing."""
        from sparsec.kernels.activation import threshold_reference

        return threshold_reference if config.mode == "teal" and config.allocation == "greedy" else None

    def report_row(self, key: str, e: dict) -> dict | None:
        """Weight bytes read per token at the measured sparsity. TEAL: only the weight rows of
        active inputs are read. CATS: the gate densely, up and down only for active channels.
        Sites at sparsity 0 stay dense and are left out."""
        if e.get("sparsity", 0) <= 0:
            return None
        dense = int(e.get("weight_bytes", 0))
        s = float(e.get("measured_sparsity", e.get("sparsity", 0.0)))
        sparse = dense * (1 - s)
        if e.get("kind") == "cats":
            shapes = e.get("weight_shapes", {})
            g = shapes.get("gate_weight", [0, 0])
            gate = dense * (g[0] * g[1]) / max(sum(v[0] * v[1] for k, v in shapes.items() if k.endswith("_weight")), 1)
            sparse = gate + (dense - gate) * (1 - s)
        return {"kind": e.get("kind", "?"), "target": float(e["sparsity"]), "measured": float(e.get("measured_sparsity", 0.0)),
                "threshold": float(e.get("threshold", float("nan"))), "bytes_dense": dense, "bytes_sparse": int(sparse)}

    def check_entry(self, key: str, entry: dict, tensors) -> None:
        """A plan entry of this pass, as ``rewrite`` and the kernels read it: a NaN threshold
        would zero every input on the reference path, a negative one keeps everything."""
        from sparsec import plancheck as pc

        kind = pc.one_of(entry, key, "kind", ("teal", "cats"))
        pc.number(entry, key, "sparsity", lo=0, hi=1, hi_open=True)
        pc.number(entry, key, "threshold", lo=0)
        pc.number(entry, key, "measured_sparsity", lo=0, hi=1, default=None)
        pc.number(entry, key, "weight_bytes", lo=0, integer=True, default=None)
        pc.names(entry, key, "weights", default=None)
        pc.shapes(entry, key, "weight_shapes", default=None)
        pc.string(entry, key, "group", default=None)
        pc.string(entry, key, "block", default=None)
        if kind == "cats":
            pc.one_of(entry, key, "activation", (*dict.fromkeys(_ACT_OPS.values()), "gelu_tanh"), default="silu")

    # -- rewrite -------------------------------------------------------------------------------
    def rewrite(self, ctx: GraphContext, sites: list[Site], config, plan) -> bool:
        import sparsec.kernels.activation  # noqa: F401  (defines the sparsec:: ops)

        graph = ctx.gm.graph
        changed = False
        for s in sites:
            entry = plan.entry_for(s)
            if entry["sparsity"] <= 0:
                continue  # a site the allocation left dense: keep the plain linear
            t = float(entry["threshold"])
            if s.kind == "teal":
                old = s.nodes["linear"]
                with graph.inserting_before(old):
                    new = graph.call_function(
                        torch.ops.sparsec.threshold_linear.default,
                        (s.nodes["input"], s.nodes["weight"], s.nodes["bias"], t),
                    )
                new.meta.update(old.meta)
                old.replace_all_uses_with(new)
                graph.erase_node(old)
            else:
                old = s.nodes["down"]
                n = s.nodes
                with graph.inserting_before(old):
                    new = graph.call_function(
                        torch.ops.sparsec.cats_mlp.default,
                        (n["input"], n["gate_weight"], n["gate_bias"], n["up_weight"], n["up_bias"],
                         n["down_weight"], n["down_bias"], t, entry.get("activation", "silu")),
                    )
                new.meta.update(old.meta)
                old.replace_all_uses_with(new)
                for dead in (old, n["mul"], n["act"], n["gate_linear"], n["up_linear"]):
                    if not dead.users:
                        graph.erase_node(dead)
            changed = True
        return changed


def _check_unique(sites: list[Site]) -> None:
    # A weight used by two linears (weight tying inside one graph) would give two sites one
    # key; the plan could not tell them apart, so suffix the later ones.
    seen: dict[str, int] = {}
    for s in sites:
        if s.key in seen:
            seen[s.key] += 1
            s.key = f"{s.key}#{seen[s.key]}"
        else:
            seen[s.key] = 0
