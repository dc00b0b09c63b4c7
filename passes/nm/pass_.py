"""The ``nm_weights`` pass: sites, plan entries, the checkpoint check and the rewrite."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.fx as fx

from sparsec.errors import PlanError, RecipeError
from sparsec.ir.rewrite import add_constant
from sparsec.ir.weights import check_weight_sample, weight_sample
from sparsec.passbase import GraphContext, Pass, Site, block_of, path_matches

from .config import NMWeightsConfig
from .prune import _mask, sparsegpt_prune, wanda_scores

__all__ = ["NMWeights", "weight_sample"]

aten = torch.ops.aten


def _weight_of(ctx: GraphContext, node) -> tuple | None:
    """``(x, weight, bias, threshold)`` for ``aten.linear`` and TEAL's ``threshold_linear``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        t = None
    else:
        schema = getattr(node.target, "_schema", None)
        if schema is None or schema.name != "sparsec::threshold_linear":
            return None
        t = float(node.args[3])
    parts = ctx.linear_args(node)
    return None if parts is None else (*parts, t)


class NMWeights(Pass):
    name = "nm_weights"
    after = ("activation_threshold",)
    # TEAL's thresholded linear becomes one nm_linear with the threshold fused
    shares_weights_with = ("activation_threshold",)
    config_cls = NMWeightsConfig

    def needs_calibration(self, config: NMWeightsConfig) -> bool:
        return True  # masks (and SparseGPT's updated weights) are decided once, into the plan

    def check_recipe(self, configs: dict) -> None:
        at = configs.get("activation_threshold")
        if getattr(at, "mode", None) == "cats":
            # CATS turns each MLP into one sparsec::cats_mlp op before this pass runs, and that
            # op reads dense weights: the MLP would stay unpruned while the plan said otherwise
            raise RecipeError("passes.nm_weights does not compose with activation_threshold mode 'cats' (the CATS "
                              "MLP kernel reads dense weights, so the MLP would stay unpruned); use mode 'teal'")

    def _wanted(self, path: str, config) -> bool:
        if config.targets and not path_matches(path, config.targets):
            return False
        return not path_matches(path, config.ignore)

    def match(self, ctx: GraphContext, config: NMWeightsConfig) -> list[Site]:
        sites, skipped = [], []
        for node in ctx.gm.graph.nodes:
            parts = _weight_of(ctx, node)
            if parts is None:
                continue
            x, w, b, _ = parts
            path = ctx.site_path(node, w)
            if not self._wanted(path, config):
                continue
            shape = [int(s) for s in ctx.val(w).shape]
            if config.structure == "nm" and shape[1] % config.m:
                skipped.append(f"{path} ({shape[1]} inputs)")
                continue
            v = ctx.val(w)
            weights = {"weight": ctx.param_name(w)}
            shapes = {"weight": shape}
            if b is not None:
                weights["bias"] = ctx.param_name(b)
                shapes["bias"] = [int(s) for s in ctx.val(b).shape]
            sites.append(Site(key=f"{path}:nm", pass_name=self.name, kind="nm", nodes={"linear": node, "input": x,
                              "weight": w, "bias": b}, weights=weights, weight_shapes=shapes,
                              weight_bytes=int(v.numel()) * v.element_size(), group=path, block=block_of(path)))
        if skipped:
            warnings.warn(f"sparsec nm_weights: m={config.m} does not divide the inputs of {len(skipped)} linear(s), "
                          f"left dense: {', '.join(skipped[:4])}", stacklevel=2)
        return sites

    # -- calibration (sparsec.calibrate calls this with the model) -----------------------------
    def calibrate_model(self, model, sites: list[Site], config: NMWeightsConfig, batches: list, progress: bool):
        """``(entries, tensors)`` for the plan."""
        from .calibration import calibrate_nm

        return calibrate_nm(self, model, sites, config, batches, progress)

    def pruned_weights(self, entries: dict, tensors: dict) -> dict[str, torch.Tensor]:
        """Parameter name -> the pruned dense weight, for each site of ``entries``: what later
        passes are calibrated on (``sparsec.calibrate`` runs them on the pruned model)."""
        from sparsec.kernels.nm import unpack

        out = {}
        for key, e in entries.items():
            name = e["weights"]["weight"]
            if e.get("structure", "nm") == "nm":
                vals = tensors[f"{key}.values"]
                out[name] = unpack(vals, tensors[f"{key}.positions"], e["n"], e["m"], vals.shape[1] // e["n"] * e["m"])
            else:
                out[name] = tensors[f"{key}.weight"]
        return out

    def calibrate_graph(self, ctx: GraphContext, sites: list[Site], config: NMWeightsConfig, example_inputs):
        """Compile without a plan: score on the compile's example inputs, on the captured graph
        (Hessians of the dense model: SparseGPT without the block-by-block propagation)."""
        from sparsec.calibrate import record_site_inputs

        stats: dict[str, torch.Tensor] = {}
        if config.method != "magnitude":
            record_site_inputs(ctx, sites, _recorder(stats, hessian=config.method == "sparsegpt"), example_inputs)
        entries, tensors = {}, {}
        for s in sites:
            w = ctx.tensors[s.weights["weight"]].detach()
            if config.method == "sparsegpt":
                pruned, keep = sparsegpt_prune(w, stats[s.key], config)
            else:
                keep = _mask(wanda_scores(w, stats[s.key]) if config.method == "wanda" else w.abs(), config)
                pruned = w * keep
            e, t = self.entry(s, config, pruned, keep, original=w)
            entries[s.key] = e
            tensors.update(t)
        return entries, tensors

    def entry(self, s: Site, config: NMWeightsConfig, pruned: torch.Tensor, keep: torch.Tensor,
              original: torch.Tensor | None = None):
        """The plan entry and tensors of one site from its pruned weight and keep-mask;
        ``original``: the dense weight it was pruned from (sampled, so that the plan refuses
        to run on another checkpoint)."""
        from sparsec.kernels.nm import pack

        w = pruned.detach().contiguous()
        tensors = {}
        if config.structure == "nm":
            values, positions = pack(w, keep, config.n, config.m)
            tensors[f"{s.key}.values"] = values
            tensors[f"{s.key}.positions"] = positions
            comp = values.numel() * values.element_size() + positions.numel()
        else:
            tensors[f"{s.key}.weight"] = (w * keep).contiguous()
            comp = s.weight_bytes
        removed = 1.0 - float(keep.float().mean())
        entry = {"pass": self.name, "kind": "nm", "n": config.n, "m": config.m, "structure": config.structure,
                 "method": config.method, "sparsity": config.removed, "measured_sparsity": removed,
                 "block": s.block, "weights": s.weights, "weight_shapes": s.weight_shapes,
                 "weight_bytes": s.weight_bytes, "compressed_bytes": int(comp)}
        if original is not None:
            entry["weight_sample"] = weight_sample(original)
        return entry, tensors

    def report_row(self, key: str, e: dict) -> dict | None:
        """Weight bytes per token: dense, and the compressed values + packed positions read."""
        dense = int(e.get("weight_bytes", 0))
        return {"kind": e.get("kind", "nm"), "target": float(e.get("sparsity", 0.0)),
                "measured": float(e.get("measured_sparsity", 0.0)), "threshold": float(e.get("threshold", float("nan"))),
                "bytes_dense": dense, "bytes_sparse": int(e.get("compressed_bytes", dense))}

    def check_entry(self, key: str, entry: dict, tensors) -> None:
        """A plan entry of this pass and its tensors, as ``rewrite`` and the kernels read them:
        values and positions of the weight's shape and dtype, every packed position inside its
        group of ``m`` and none twice in a group (the C++ kernel indexes the input by them: a
        crafted position reads and writes outside the group)."""
        from sparsec import plancheck as pc
        from sparsec.kernels.nm import bits_for

        pc.one_of(entry, key, "kind", ("nm",))
        structure = pc.one_of(entry, key, "structure", ("nm", "unstructured"), default="nm")
        pc.names(entry, key, "weights", required=("weight",))
        out_f, in_f = pc.shapes(entry, key, "weight_shapes", required={"weight": 2})["weight"]
        pc.number(entry, key, "sparsity", lo=0, hi=1, hi_open=True)
        pc.number(entry, key, "measured_sparsity", lo=0, hi=1, default=None)
        for k in ("weight_bytes", "compressed_bytes"):
            pc.number(entry, key, k, lo=0, integer=True, default=None)
        pc.numbers(entry, key, "weight_sample", default=None)
        pc.string(entry, key, "method", default=None)
        pc.string(entry, key, "block", default=None)
        if structure == "unstructured":
            pc.tensor(tensors, key, f"{key}.weight", floating=True, shape=[out_f, in_f])
            return
        n = pc.number(entry, key, "n", integer=True, lo=1)
        m = pc.number(entry, key, "m", integer=True, lo=2, hi=256)
        if n >= m:
            raise PlanError(f"site {key!r}: 'n' is {n}; keep n of every m needs n < m, and m is {m}")
        if in_f % m:
            raise PlanError(f"site {key!r}: 'm' is {m}, which does not divide the weight's {in_f} inputs")
        kept, bits = in_f // m * n, bits_for(m)
        per_byte = 8 // bits
        width = -(-(-(-kept // per_byte)) // 4) * 4  # bytes per row, padded to 32 bits
        pc.tensor(tensors, key, f"{key}.values", floating=True, shape=[out_f, kept],
                  why=f"{n}:{m} of a [{out_f}, {in_f}] weight")
        name = f"{key}.positions"
        pos = pc.tensor(tensors, key, name, dtype=torch.uint8, shape=[out_f, width],
                        why=f"{kept} {bits}-bit positions per row, rows padded to 4 bytes")
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        step = max(1, (1 << 22) // max(kept, 1))  # rows per chunk: a few MiB of unpacked positions
        if (kept * bits) % 8 == 0 and 8 % (n * bits) == 0:
            # no group straddles a byte (1:m, 2:4, 2:8, 2:16): judge each of the 256 byte values
            # once and look the bytes up; the field-by-field pass below only locates a problem
            fields = ((torch.arange(256, dtype=torch.uint8).unsqueeze(-1) >> shifts) & ((1 << bits) - 1))
            groups = fields.reshape(256, -1, n).sort(-1).values
            bad_byte = (groups[..., 1:] == groups[..., :-1]).flatten(1).any(-1)
            if (1 << bits) > m:  # else every field is below m (and m = 256 does not fit in uint8)
                bad_byte |= (fields >= m).any(-1)
            used = kept * bits // 8  # the bytes after these pad the row
            if not any(bool(bad_byte[pos[r0:r0 + step * 8, :used].int()].any()) for r0 in range(0, out_f, step * 8)):
                return
        for r0 in range(0, out_f, step):
            p = pos[r0:r0 + step]
            f = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(p.shape[0], -1)[:, :kept]
            f = f.reshape(p.shape[0], kept // n, n)
            bad = f >= m if (1 << bits) > m else None
            if bad is not None and bool(bad.any()):
                r, g, j = (int(i) for i in bad.nonzero()[0])
                raise pc.PlanTensorError(f"site {key!r}: tensor {name!r} holds position {int(f[r, g, j])} in group {g} "
                                         f"of row {r0 + r}; {n}:{m} positions must be below {m}")
            s = f.sort(-1).values if n > 2 else f
            twice = s[..., 1:] == s[..., :-1]
            if bool(twice.any()):
                r, g, j = (int(i) for i in twice.nonzero()[0])
                raise pc.PlanTensorError(f"site {key!r}: tensor {name!r} holds position {int(s[r, g, j])} twice in "
                                         f"group {g} of row {r0 + r}")

    # -- rewrite ----------------------------------------------------------------------------------
    def rewrite(self, ctx: GraphContext, sites: list[Site], config: NMWeightsConfig, plan) -> bool:
        """N:M sites that read one input with one threshold and no bias (q/k/v, gate/up) become
        one ``nm_linear`` over their rows stacked (the format is per output row), its output
        sliced per linear: SmolLM2 makes 120 calls per token instead of 210."""
        import sparsec.kernels.nm  # noqa: F401  (defines sparsec::nm_linear)

        graph = ctx.gm.graph
        groups: dict[tuple, list] = {}
        for s in sites:
            e = plan.entry_for(s)
            _check_checkpoint(ctx, s, e)
            # the graph runs the plan's weights from here on: a later call with another weight
            # (a second checkpoint reusing the compiled code, an in-place update) must refuse
            ctx.pin_weight(e["weights"]["weight"], f"the plan's pruned weights for {s.key!r}")
            old = s.nodes["linear"]
            x, w, b, t = _weight_of(ctx, old)
            if e.get("structure", "nm") != "nm":
                wt = plan.tensors.get(f"{s.key}.weight")
                if wt is None:
                    raise PlanError(f"the plan has no pruned weight for site {s.key!r}")
                wa = _constant(ctx, f"{s.key}.weight", wt.to(ctx.val(w).dtype), old)
                with graph.inserting_before(old):
                    args = (x, wa, b) if t is None else (x, wa, b, t)
                    new = graph.call_function(aten.linear.default if t is None else old.target, args)
                new.meta.update(old.meta)
                old.replace_all_uses_with(new)
                graph.erase_node(old)
                continue
            vals = plan.tensors.get(f"{s.key}.values")
            pos = plan.tensors.get(f"{s.key}.positions")
            if vals is None or pos is None:
                raise PlanError(f"the plan has no compressed weights for site {s.key!r}")
            key = (x, t, int(e["n"]), int(e["m"])) if b is None else (s.key,)
            groups.setdefault(key, []).append((s, old, b, t, vals.to(ctx.val(w).dtype), pos, int(e["n"]), int(e["m"])))
        for members in groups.values():
            s0, first, b, t, _, _, n, m = members[0]
            x = first.args[0]
            name = "+".join(mm[0].key for mm in members)
            va = _constant(ctx, f"{name}.values", torch.cat([mm[4] for mm in members]), first)
            if config.dense_copy:  # the kernel's cached dense copy goes when these values do
                values = getattr(ctx.gm, va.target)
                weakref.finalize(values, _drop_dense_copy, values._cdata)
            pa = _constant(ctx, f"{name}.positions", torch.cat([mm[5] for mm in members]), first)
            with graph.inserting_before(first):
                fused = graph.call_function(torch.ops.sparsec.nm_linear.default,
                                            (x, va, pa, b, n, m, -1.0 if t is None else t, config.dense_copy))
            fused.meta.update(first.meta)
            row = 0
            for _, old, _, _, member_vals, *_ in members:
                rows = member_vals.shape[0]
                if len(members) == 1:
                    out = fused
                else:
                    with graph.inserting_before(first):
                        out = graph.call_function(aten.slice.Tensor, (fused, -1, row, row + rows))
                    out.meta.update(old.meta)
                row += rows
                old.replace_all_uses_with(out)
            for _, old, *_ in members:  # after all insertions: `first` anchors them
                graph.erase_node(old)
        return bool(sites)


def _recorder(stats: dict, hessian: bool):
    """A graph-callable that accumulates Wanda's ``sum x^2`` or SparseGPT's ``sum x x^T``.

    A closure, so that the graph's arguments stay plain (FX copies dict arguments and cannot
    print arbitrary objects into its generated code)."""

    def sparsec_nm_record(x: torch.Tensor, key: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        v = x.T @ x if hessian else x.pow(2).sum(0)
        stats[key] = stats[key] + v if key in stats else v

    return sparsec_nm_record


def _drop_dense_copy(impl: int) -> None:
    """Free the dense copy (kernels/nm/csrc/nm_sparse.cpp) of compressed values being freed (their
    TensorImpl address): the C++ cache holds the values by a weak reference, which cannot
    call back when they die."""
    with contextlib.suppress(Exception):  # at interpreter exit the modules may already be gone
        from sparsec.kernels import cpu

        ext = cpu.loaded()  # not loaded: no copy was ever made
        if ext is not None:
            ext.nm_drop_dense_copy(impl)


def _check_checkpoint(ctx: GraphContext, s: Site, e: dict) -> None:
    """An N:M plan *replaces* the weights of its sites: applied to another checkpoint of the
    architecture (a fine-tune, say), it would silently run the calibrated one's weights."""
    check_weight_sample(ctx, s.key, e, "N:M weights")


def _constant(ctx: GraphContext, key: str, value: torch.Tensor, like: fx.Node | None = None) -> fx.Node:
    """A ``get_attr`` node for a plan tensor, placed on the graph module (export lifts it)."""
    return add_constant(ctx, key, value, like)