"""N:M weight sparsity: ``aten.linear(x, W, b)`` -> ``sparsec::nm_linear(x, values, positions, b, n, m, -1)``.

Every linear with a 2-D parameter weight whose input size ``m`` divides is a site (module-path
``targets``/``ignore``; the lm_head and embeddings are ignored by default). Masks keep ``n`` of
every ``m`` consecutive inputs of each output row, chosen by

- ``magnitude``: ``|W_ij|``;
- ``wanda``: ``|W_ij| * ||X_j||_2`` (``X_j``: input feature j over the calibration tokens);
- ``sparsegpt``: the OBS update of ALGORITHMS.md (damped Hessian ``X X^T``, upper Cholesky
  factor of its inverse, blocks of ``blocksize`` columns, mask chosen inside each block by
  ``w^2 / Hinv_jj^2``, error propagated to later columns), block by block through the model on
  the outputs of the already-pruned blocks, one layer's Hessian in memory at a time.

``structure: unstructured`` keeps the top ``1 - sparsity`` of each output row instead (a
masked dense weight: no kernel speedup, for quality comparisons).

The compressed weights (values + packed positions, ``sparsec.kernels.nm``) live in the plan;
the user's model is never modified. With ``activation_threshold`` (TEAL) in the same recipe,
the thresholded linear becomes one fused ``nm_linear`` with the threshold.

Example recipe::

    {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "sparsegpt"}}}
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsec.errors import PassError, PlanError, RecipeError
from sparsec.hookspecs import hookimpl
from sparsec.passbase import GraphContext, Pass, Site, block_of, path_matches

__all__ = ["NMWeightsConfig", "NMWeights", "sparsegpt_prune", "wanda_scores"]

aten = torch.ops.aten

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class NMWeightsConfig:
    #: keep n of every m consecutive input weights of each output row
    n: int = 2
    m: int = 4
    #: mask scoring: "magnitude", "wanda" or "sparsegpt"
    method: str = "magnitude"
    #: "nm" (N:M groups, compressed, fast kernels) or "unstructured" (per-row top-k, masked dense)
    structure: str = "nm"
    #: unstructured only: the fraction of each row's weights removed, in [0, 1)
    sparsity: float = 0.5
    #: module-path patterns to rewrite (empty: every linear that fits)
    targets: list[str] = field(default_factory=list)
    #: module-path patterns never to rewrite
    ignore: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens", "embed", "wte", "wpe"])
    #: sparsegpt: columns per lazy-update block
    blocksize: int = 128
    #: sparsegpt: Hessian damping, as a fraction of mean(diag H)
    damp: float = 0.01
    #: CPU calls where a dense GEMM beats the N:M kernels (more than 16 tokens; bf16 from 5
    #: tokens on AMX CPUs) use a masked dense copy of the weight, made on the first such call:
    #: those run at dense speed, at the cost of the dense weight's memory once prefill has
    #: run. False: unpack blocks on the fly instead (no extra memory; prefill 0.5-1.0x dense)
    dense_copy: bool = True

    def validate(self) -> None:
        for k in ("n", "m", "blocksize"):
            if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool):
                raise RecipeError(f"{k} must be an integer, got {getattr(self, k)!r}")
        if self.structure not in ("nm", "unstructured"):
            raise RecipeError(f"structure must be 'nm' or 'unstructured', got {self.structure!r}")
        if self.structure == "nm":
            if self.n < 1 or self.m < 2:
                raise RecipeError(f"n must be >= 1 and m >= 2, got n={self.n}, m={self.m}")
            if self.n >= self.m:
                raise RecipeError(f"n must be smaller than m (keep n of every m), got n={self.n}, m={self.m}")
            if self.m > 256:
                raise RecipeError(f"m must be at most 256, got {self.m}")
        if self.method not in METHODS:
            from sparsec.errors import did_you_mean

            raise RecipeError(f"method must be one of {list(METHODS)}, got {self.method!r}{did_you_mean(str(self.method), METHODS)}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        # settings of the other structure would be ignored: say so (their defaults are harmless,
        # and a saved plan's recipe carries every default)
        if self.structure == "nm" and self.sparsity != 0.5:
            raise RecipeError(f"sparsity applies to structure 'unstructured'; with N:M, n and m set it "
                              f"(n={self.n}, m={self.m} removes {1 - self.n / self.m:.0%})")
        if self.structure == "unstructured" and (self.n, self.m) != (2, 4):
            raise RecipeError(f"n and m apply to structure 'nm'; unstructured pruning removes 'sparsity' "
                              f"({self.sparsity}) of each row")
        if self.blocksize < 1:
            raise RecipeError(f"blocksize must be positive, got {self.blocksize}")
        if not (self.damp >= 0):
            raise RecipeError(f"damp must not be negative, got {self.damp}")
        if not isinstance(self.dense_copy, bool):
            raise RecipeError(f"dense_copy must be true or false, got {self.dense_copy!r}")

    @property
    def removed(self) -> float:
        return 1 - self.n / self.m if self.structure == "nm" else self.sparsity


# ---- scoring and pruning ---------------------------------------------------------------------------


def wanda_scores(w: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``."""
    return w.detach().float().abs() * sumsq.float().sqrt().unsqueeze(0)


def _mask(scores: torch.Tensor, cfg: NMWeightsConfig) -> torch.Tensor:
    from sparsec.kernels.nm import nm_mask, unstructured_mask

    if cfg.structure == "nm":
        return nm_mask(scores, cfg.n, cfg.m)
    return unstructured_mask(scores, cfg.sparsity)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, cfg: NMWeightsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one layer: ``(pruned weight, mask)``.

    ``H = sum x x^T`` over the layer's calibration inputs. Dead inputs (``H_jj = 0``) get
    ``H_jj = 1`` and their weights are zeroed first, as in the reference implementation.
    Unstructured: within each block the lowest ``sparsity`` fraction of ``w^2/Hinv_jj^2`` per
    row is pruned (the reference's per-block row-wise variant, a close stand-in for its
    global-per-layer choice).
    """
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        # H = X^T X is singular when the calibration tokens are fewer than the inputs; the
        # damping is what makes it invertible
        raise PassError(f"sparsegpt: the {cols}x{cols} Hessian is not positive definite with damp={cfg.damp}; "
                        "raise damp (0.01 is SparseGPT's) or calibrate on more tokens") from None
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    bs = cfg.blocksize
    if cfg.structure == "nm":
        bs = max(cfg.m, bs - bs % cfg.m)  # blocks hold whole groups
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if cfg.structure == "unstructured":
            score = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(round(score.shape[1] * cfg.sparsity))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if cfg.structure == "nm" and i % cfg.m == 0:
                tmp = W1[:, i:i + cfg.m] ** 2 / torch.diag(Hinv1)[i:i + cfg.m].reshape(1, -1) ** 2
                drop = torch.sort(tmp, dim=1, stable=True).indices[:, : cfg.m - cfg.n]
                mask1.scatter_(1, i + drop, True)
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w_col - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype), ~mask


# ---- the pass ----------------------------------------------------------------------------------------


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
        from .nm_calibration import calibrate_nm

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
        stats: dict[str, torch.Tensor] = {}
        added = []
        if config.method != "magnitude":
            record = _recorder(stats, hessian=config.method == "sparsegpt")
            graph = ctx.gm.graph
            for s in sites:
                with graph.inserting_after(s.nodes["input"]):
                    added.append(graph.call_function(record, (s.nodes["input"], s.key)))
            ctx.gm.recompile()
            try:
                with torch.no_grad():
                    ctx.gm(*example_inputs)
            finally:
                for n in added:
                    graph.erase_node(n)
                ctx.gm.recompile()
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
    """Free the dense copy (kernels/csrc/nm_sparse.cpp) of compressed values being freed (their
    TensorImpl address): the C++ cache holds the values by a weak reference, which cannot
    call back when they die."""
    with contextlib.suppress(Exception):  # at interpreter exit the modules may already be gone
        from sparsec.kernels import cpu

        ext = cpu.loaded()  # not loaded: no copy was ever made
        if ext is not None:
            ext.nm_drop_dense_copy(impl)


def weight_sample(w: torch.Tensor, k: int = 16) -> list[float]:
    """``k`` values of ``w`` at fixed, spread-out flat positions: a fingerprint of the dense
    weight a plan's N:M weights were made from."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    # integer positions, the same on every machine and torch version (a float linspace rounds
    # differently above 2^24 elements)
    idx = sorted({i * (n - 1) // (k - 1) for i in range(k)}) if n else []
    return [float(v) for v in flat[torch.tensor(idx, dtype=torch.long)].float().cpu()]


def _check_checkpoint(ctx: GraphContext, s: Site, e: dict) -> None:
    """An N:M plan *replaces* the weights of its sites: applied to another checkpoint of the
    architecture (a fine-tune, say), it would silently run the calibrated one's weights."""
    want = e.get("weight_sample")
    w = ctx.tensors.get(e["weights"]["weight"])
    if want is None or w is None or w.device.type == "meta" or isinstance(w, torch._subclasses.FakeTensor):
        return  # a plan from before fingerprints, or no concrete weight to compare
    got = weight_sample(w)
    # the plan's sample in the model's dtype: a bf16 copy of the calibrated fp32 model matches
    want = [float(v) for v in torch.tensor(want, dtype=torch.float64).to(w.dtype).float()]
    if got != want:
        raise PlanError(f"the plan's N:M weights for {s.key!r} were made from another checkpoint: the model's "
                        f"weight differs from the one calibrated (e.g. {got[0]:.6g} vs {want[0]:.6g} at its "
                        "first element). Calibrate this model: sparsec.calibrate(model, batches, recipe)")


def _constant(ctx: GraphContext, key: str, value: torch.Tensor, like: fx.Node | None = None) -> fx.Node:
    """A ``get_attr`` node for a plan tensor, placed on the graph module (export lifts it)."""
    gm = ctx.gm
    name = "_sparsec_" + "".join(c if c.isalnum() else "_" for c in key)
    if not hasattr(gm, name):
        device = next((t.device for t in ctx.tensors.values()), torch.device("cpu"))
        gm.register_buffer(name, value.to(device))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(name)
    node.meta["val"] = getattr(gm, name)
    # torch.export's constant lifting reads the module stack of every constant it lifts
    node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {})) if like is not None else {}
    return node


_PASS = NMWeights()


@hookimpl
def sparsec_register_passes(register):
    register(_PASS)


@hookimpl
def sparsec_register_lowerings(register):
    from sparsec.codegen import Lowering

    # nm_linear runs as emitted (its compressed weights are the plan's); it adds a residual in
    # its epilogue, and on CUDA becomes a triton_op twin (the activation family's Triton swap
    # covers every generated kernel: sparsec.kernels.triton_gen.use_triton_ops)
    register("sparsec::nm_linear", Lowering(epilogue="residual"))


#: named recipes of this family (``sparsec recipes`` lists them)
RECIPES = {
    "magnitude-24": ("2:4 weights by magnitude (no calibration data used)", {"n": 2, "m": 4, "method": "magnitude"}),
    "wanda-24": ("2:4 weights, Wanda scores |W| ||X||", {"n": 2, "m": 4, "method": "wanda"}),
    "sparsegpt-24": ("2:4 weights, SparseGPT (OBS updates, block by block)", {"n": 2, "m": 4, "method": "sparsegpt"}),
}


@hookimpl
def sparsec_register_recipes(register):
    for name, (desc, section) in RECIPES.items():
        register(name, {"passes": {"nm_weights": section}}, description=desc)
    register("sparsegpt-24-teal-40",
             {"passes": {"nm_weights": RECIPES["sparsegpt-24"][1],
                         "activation_threshold": {"mode": "teal", "sparsity": 0.40}}},
             description="2:4 SparseGPT weights and TEAL 40% inputs, fused into one op per linear")


@hookimpl
def sparsec_register_dense_forms(register):
    register(torch.ops.sparsec.nm_linear.default, nm_linear_dense_form)


def nm_linear_dense_form(node: fx.Node, tensor_of):
    """``nm_linear`` as a linear on its unpacked (masked, zero-filled) weight, for exports that
    need a plain weight (ONNX ``nm_format="dense"``; MLIR, with the ``structured[N, M]`` encoding)."""
    from sparsec.export_program import DenseForm
    from sparsec.kernels.nm import unpack
    from sparsec.mlir_export import nm_encoding

    x, values, positions, bias, n, m, threshold = node.args[:7]  # dense_copy: a CPU runtime choice
    vals, pos = tensor_of(values), tensor_of(positions)
    weight = unpack(vals, pos, n, m, vals.shape[1] // n * m)
    residual = node.kwargs.get("residual", node.args[8] if len(node.args) > 8 else None)

    def build(g: fx.Graph, w: fx.Node) -> fx.Node:
        if threshold >= 0:
            new = g.call_function(torch.ops.sparsec.threshold_linear.default, (x, w, bias, threshold))
        else:
            new = g.call_function(aten.linear.default, (x, w, bias))
        if residual is not None:  # the fused residual-add epilogue
            new.meta.update(node.meta)
            new = g.call_function(aten.add.Tensor, (new, residual))
        return new

    return DenseForm(weight=weight, build=build, encoding=nm_encoding(n, m))

