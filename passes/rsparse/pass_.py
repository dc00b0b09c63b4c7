"""The ``rsparse`` pass: sites, plan entries and their check, the report row and the rewrite."""

from __future__ import annotations

import torch
import torch.fx as fx

from sparsec.errors import PlanError
from sparsec.ir import GraphContext, LinearMatch, SiteFilter, add_constant, match_linears
from sparsec.ir.weights import check_weight_sample, weight_sample
from sparsec.passbase import Pass, Site, block_of

from .config import RSparseConfig
from .search import Choice, planned_weights

__all__ = ["RSparse"]


class RSparse(Pass):
    name = "rsparse"
    # it replaces whole linears: the thresholding and N:M passes must not see (or claim) them
    before = ("activation_threshold", "nm_weights")
    config_cls = RSparseConfig

    def needs_calibration(self, config: RSparseConfig) -> bool:
        return True  # thresholds and factors come from the weights and calibration inputs

    def match(self, ctx: GraphContext, config: RSparseConfig) -> list[Site]:
        wanted = SiteFilter.of(config)
        found, _ = match_linears(ctx)
        sites = []
        for m in found:
            if not wanted(m.path):
                continue
            sites.append(_site(self.name, m, ctx))
        keys = [s.key for s in sites]
        if len(set(keys)) != len(keys):  # a weight used by two linears: one plan entry would serve both
            seen, dup = set(), []
            for s in sites:
                (dup if s.key in seen else seen.add(s.key) or []).append(s.key)
            sites = [s for s in sites if s.key not in dup]
        return sites

    # -- calibration (sparsec.calibrate calls these) -----------------------------------------
    def calibrate_model(self, model, sites: list[Site], config: RSparseConfig, batches: list, progress: bool):
        from .calibration import calibrate_rsparse

        return calibrate_rsparse(self, model, sites, config, batches, progress)

    def calibrate_graph(self, ctx: GraphContext, sites: list[Site], config: RSparseConfig, example_inputs):
        """Compile without a plan: the per-layer search on the compile's example inputs (no
        model to score an allocation on: every layer at the recipe's density)."""
        from sparsec.calibrate import record_site_inputs

        from .calibration import calibrate_rsparse

        inputs: dict[str, torch.Tensor] = {}

        def sparsec_rsparse_record(x: torch.Tensor, key: str) -> None:
            inputs[key] = x.detach().reshape(-1, x.shape[-1]).float()[: config.tokens].clone()

        record_site_inputs(ctx, sites, sparsec_rsparse_record, example_inputs)
        weights = {s.key: ctx.tensors[s.weights["weight"]] for s in sites}
        local = RSparseConfig(**{**vars(config), "search": "layer" if config.search == "greedy" else config.search})
        return calibrate_rsparse(self, None, sites, local, [], False, weights=weights, inputs=inputs)

    def entry(self, s: Site, config: RSparseConfig, c: Choice, in_f: int, out_f: int, active: float,
              fixed_error: float, weight: torch.Tensor) -> dict:
        """The plan entry of one site (its tensors: ``<key>.scale``, ``.v``, ``.us``)."""
        planned = planned_weights(in_f, out_f, c)
        read = active * in_f * out_f + c.rank * (in_f + out_f)  # by the budget's count, measured mask
        return {"pass": self.name, "kind": "rsparse", "density": c.density, "target_density": config.density,
                "search": config.search, "alpha": c.alpha(in_f, out_f), "channels": c.channels, "rank": c.rank,
                "threshold": c.threshold, "error": c.error, "error_fixed_alpha": fixed_error,
                "active_fraction": active, "planned_density": planned / (in_f * out_f),
                "measured_density": read / (in_f * out_f), "block": s.block, "weights": s.weights,
                "weight_shapes": s.weight_shapes, "weight_bytes": s.weight_bytes,
                "weight_sample": weight_sample(weight)}

    def report_row(self, key: str, e: dict) -> dict | None:
        """Weight bytes a token reads: the active rows of ``W^T`` (the measured share of
        channels) plus both factors, by the budget's count."""
        dense = int(e.get("weight_bytes", 0))
        return {"kind": "rsparse", "target": 1.0 - float(e.get("target_density", e.get("density", 1.0))),
                "measured": 1.0 - float(e.get("measured_density", 1.0)), "threshold": float(e.get("threshold", float("nan"))),
                "bytes_dense": dense, "bytes_sparse": int(round(dense * float(e.get("measured_density", 1.0))))}

    def check_entry(self, key: str, entry: dict, tensors) -> None:
        """An entry and its tensors as ``rewrite`` and the kernels read them: factors of the
        weight's shape with the entry's rank, a finite threshold, a scale per input."""
        from sparsec import plancheck as pc

        pc.one_of(entry, key, "kind", ("rsparse",))
        pc.names(entry, key, "weights", required=("weight",))
        out_f, in_f = pc.shapes(entry, key, "weight_shapes", required={"weight": 2})["weight"]
        if pc.number(entry, key, "density", lo=0, hi=1) == 0:
            raise PlanError(f"site {key!r}: 'density' is 0; it must be in (0, 1]")
        rank = pc.number(entry, key, "rank", integer=True, lo=0, hi=min(in_f, out_f))
        pc.number(entry, key, "channels", integer=True, lo=0, hi=in_f)
        pc.number(entry, key, "threshold")  # finite: "no channel active" is FLT_MAX, not inf
        pc.numbers(entry, key, "weight_sample", default=None)
        pc.tensor(tensors, key, f"{key}.scale", floating=True, shape=[in_f])
        pc.tensor(tensors, key, f"{key}.v", floating=True, shape=[in_f, rank], why=f"rank {rank}")
        pc.tensor(tensors, key, f"{key}.us", floating=True, shape=[rank, out_f], why=f"rank {rank}")

    # -- rewrite ----------------------------------------------------------------------------
    def rewrite(self, ctx: GraphContext, sites: list[Site], config: RSparseConfig, plan) -> bool:
        """Each linear -> ``sparsec::rsparse_linear(x, W, b, scale, v, us, t)``; the factors
        are the plan's (constants of the graph module), the weight the model's own."""
        import sparsec.kernels.rsparse  # noqa: F401  (defines the sparsec::rsparse ops)

        graph = ctx.gm.graph
        for s in sites:
            e = plan.entry_for(s)
            check_weight_sample(ctx, s.key, e, "R-Sparse factors")
            # the factors come from this weight's SVD: a later call with another weight (a second
            # checkpoint reusing the compiled code, an in-place update) must refuse, not mix them
            ctx.pin_weight(e["weights"]["weight"], f"the plan's low-rank factors for {s.key!r}")
            old: fx.Node = s.nodes["linear"]
            dtype = ctx.val(s.nodes["weight"]).dtype
            tensors = {}
            for role in ("scale", "v", "us"):
                t = plan.tensors.get(f"{s.key}.{role}")
                if t is None:
                    raise PlanError(f"the plan has no tensor {s.key}.{role} for site {s.key!r}")
                tensors[role] = add_constant(ctx, f"{s.key}.{role}", t.to(torch.float32 if role == "scale" else dtype), old)
            with graph.inserting_before(old):
                new = graph.call_function(torch.ops.sparsec.rsparse_linear.default,
                                          (s.nodes["input"], s.nodes["weight"], s.nodes["bias"], tensors["scale"],
                                           tensors["v"], tensors["us"], float(e["threshold"])))
            new.meta.update(old.meta)
            old.replace_all_uses_with(new)
            graph.erase_node(old)
        return bool(sites)


def _site(pass_name: str, m: LinearMatch, ctx: GraphContext) -> Site:
    weights = {"weight": m.weight_name}
    shapes = {"weight": [m.out_features, m.in_features]}
    if m.bias is not None:
        weights["bias"] = m.bias_name
        shapes["bias"] = [int(d) for d in ctx.val(m.bias).shape]
    return Site(key=m.path, pass_name=pass_name, kind="rsparse",
                nodes={"linear": m.node, "input": m.input, "weight": m.weight, "bias": m.bias},
                weights=weights, weight_shapes=shapes, weight_bytes=m.weight_bytes, group=m.path,
                block=block_of(m.path))
