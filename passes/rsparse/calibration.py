"""Calibration for ``rsparse``: inputs per layer, the SVDs, the per-layer search and the
allocation of density across layers, into plan entries and tensors.

Runs on the eager model with hooks on the sites' ``nn.Linear`` modules (or, for a compile
without a plan, on the captured graph with recording nodes). The user's model is never
modified.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch

from sparsec.calibrate import model_scorer, split_batch

from .search import Choice, LayerSVD, channel_grid, choices, layer_svd

__all__ = ["collect_inputs", "calibrate_rsparse", "rsparse_transform", "allocate"]


def _rows(x: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` rows of ``x`` (flattened to ``[T, in]``), evenly spaced."""
    x = x.detach().reshape(-1, x.shape[-1])
    if x.shape[0] <= keep:
        return x.float().clone()
    idx = torch.linspace(0, x.shape[0] - 1, keep).round().long()
    return x[idx].float()


def collect_inputs(model, sites, batches, tokens: int) -> dict[str, torch.Tensor]:
    """Up to ``tokens`` input rows per site, spread evenly over ``batches``."""
    per_batch = max(1, math.ceil(tokens / max(len(batches), 1)))
    got: dict[str, list] = defaultdict(list)
    hooks = []
    for s in sites:
        mod = model.get_submodule(s.key)

        def hook(m, args, key=s.key):
            got[key].append(_rows(args[0], per_batch))

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = split_batch(batch)
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v)[:tokens] for k, v in got.items()}


def rsparse_transform(x: torch.Tensor, value) -> torch.Tensor:
    """What R-Sparse does to a linear's input, as the linear sees it: with ``W V_r = U_r S_r``,
    ``W (x m + V_r V_r^T x (1 - m))`` is the rewritten op's output. ``value``: ``(scale,
    threshold, V_r)``. Used to score choices on the model."""
    from sparsec.kernels.rsparse import rsparse_mask

    scale, t, vr = value
    m = rsparse_mask(x, scale, t)
    zero = torch.zeros((), dtype=x.dtype)
    xs, xc = torch.where(m, x, zero), torch.where(m, zero, x)
    if vr.shape[1]:
        xs = xs + ((xc.float() @ vr) @ vr.t()).to(x.dtype)
    return xs


def _levels(config) -> list[float]:
    """The densities a layer may take: ``density`` (greedy: +- spread in steps), within (0, 1]."""
    d = config.density
    if config.search != "greedy" or config.greedy_spread <= 0:
        return [d]
    n = int(round(config.greedy_spread / config.greedy_step))
    out = {round(d + i * config.greedy_step, 6) for i in range(-n, n + 1)}
    return sorted(x for x in out if 0 < x <= 1) or [d]


def allocate(sites, curves: dict[str, dict[float, Choice]], config, scorer, values) -> tuple[dict[str, Choice], dict]:
    """Density per layer (``search: greedy``).

    Every layer starts at ``density + spread``; steps lower the layer whose next level down
    adds the least predicted model KL per byte saved, until the weights read fit the budget
    ``density * sum(in out)``. A layer's predicted KL is its relative output error times its
    block's sensitivity ``c_b = KL_b / sum_{l in b} e_l(density)`` (``KL_b``: the model's mean
    next-token KL on held-out tokens with only block ``b`` rewritten at ``density``). The result
    is kept only if the whole model's KL is lower than with every layer at ``density``.
    ``values(choices)``: the scorer values of a set of choices. Returns the choices and a
    summary (both KLs, which won).
    """
    d = config.density
    uniform = {s.key: curves[s.key][d] for s in sites}
    size = {s.key: s.weight_shapes["weight"][0] * s.weight_shapes["weight"][1] for s in sites}
    blocks: dict[str, list] = defaultdict(list)
    for s in sites:
        blocks[s.block].append(s.key)
    sens = {}
    for b, keys in blocks.items():
        err = sum(uniform[k].error for k in keys)
        kl = scorer.model_kl(values({k: uniform[k] for k in keys}))
        sens[b] = kl / err if err > 0 else 0.0
    block_of = {s.key: s.block for s in sites}
    levels = {k: sorted(curves[k]) for k in curves}
    idx = {k: len(levels[k]) - 1 for k in curves}  # the highest density each may take
    budget = d * sum(size.values())
    used = sum(levels[k][idx[k]] * size[k] for k in curves)
    while used > budget + 1e-6:
        best, best_cost = None, math.inf
        for k, i in idx.items():
            if i == 0:
                continue
            hi, lo = curves[k][levels[k][i]], curves[k][levels[k][i - 1]]
            saved = (levels[k][i] - levels[k][i - 1]) * size[k]
            cost = sens[block_of[k]] * (lo.error - hi.error) / saved
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:
            break
        used -= (levels[best][idx[best]] - levels[best][idx[best] - 1]) * size[best]
        idx[best] -= 1
    greedy = {k: curves[k][levels[k][i]] for k, i in idx.items()}
    kl_uniform = scorer.model_kl(values(uniform))
    kl_greedy = scorer.model_kl(values(greedy))
    won = kl_greedy < kl_uniform and used <= budget + 1e-6
    return (greedy if won else uniform), {"kl_uniform": kl_uniform, "kl_greedy": kl_greedy,
                                          "allocation": "greedy" if won else "uniform"}


def _search(svds: dict[str, LayerSVD], sites, config) -> dict[str, dict[float, Choice]]:
    from .search import fixed_choice

    levels = _levels(config)
    curves = {}
    for s in sites:
        svd = svds[s.key]
        if config.search == "fixed":
            curves[s.key] = {d: fixed_choice(svd, d, config.alpha) for d in levels}
            continue
        grid = set(channel_grid(svd.in_features, config.alpha_steps))
        # the fixed split of every level is in the grid: the search never does worse than it
        grid |= {min(svd.in_features, math.floor(0.5 * d * svd.in_features + 1e-9)) for d in levels}
        curves[s.key] = choices(svd, levels, sorted(grid))
    return curves


def calibrate_rsparse(pass_, model, sites, config, batches, progress: bool, weights=None, inputs=None):
    """``(entries, tensors)`` for the plan. ``weights``/``inputs``: a weight and calibration
    inputs per site given directly (a compile without a plan); else read from ``model`` and
    collected by running it on ``batches``."""
    from tqdm.auto import tqdm

    from .search import fixed_choice

    held: list = []
    if inputs is None:
        if config.search == "greedy" and config.greedy_batches and len(batches) > 1:
            n = min(config.greedy_batches, len(batches) - 1)
            batches, held = batches[:-n], batches[-n:]
        inputs = collect_inputs(model, sites, batches, config.tokens)
    if weights is None:
        weights = {s.key: model.get_parameter(s.weights["weight"]) for s in sites}
    svds = {}
    for s in tqdm(sites, desc="sparsec rsparse: SVDs", unit="layer", leave=False, disable=not progress):
        svds[s.key] = layer_svd(weights[s.key], inputs[s.key])
    curves = _search(svds, sites, config)

    def values(chosen: dict[str, Choice]):
        return {k: (svds[k].scale, c.threshold, svds[k].v[:, : c.rank]) for k, c in chosen.items()}

    summary: dict = {"allocation": "uniform"}
    if config.search == "greedy":
        scorer, why = (model_scorer(model, sites, held, rsparse_transform) if held and model is not None
                       else (None, "no held-out batches (give two or more)"))
        if scorer is None:
            warnings.warn(f"sparsec rsparse: greedy search allocates no density across layers ({why}): every "
                          "layer at the recipe's density, each with its own split", stacklevel=3)
            chosen = {s.key: curves[s.key][config.density] for s in sites}
        else:
            scorer.progress = progress
            chosen, summary = allocate(sites, curves, config, scorer, values)
    else:
        chosen = {s.key: curves[s.key][config.density] for s in sites}
    entries, tensors = {}, {}
    for s in sites:
        c, svd = chosen[s.key], svds[s.key]
        w = weights[s.key]
        in_f, out_f = svd.in_features, svd.out_features
        active = float((svd.scores > c.threshold).float().mean()) if svd.x.numel() else 0.0
        fixed = fixed_choice(svd, c.density, 0.5)
        entries[s.key] = pass_.entry(s, config, c, in_f, out_f, active, fixed.error, w)
        entries[s.key]["allocation"] = summary["allocation"]
        r = c.rank
        tensors[f"{s.key}.scale"] = svd.scale.clone()
        tensors[f"{s.key}.v"] = svd.v[:, :r].to(w.dtype).contiguous()
        tensors[f"{s.key}.us"] = (svd.u[:, :r] * svd.s[:r]).t().to(w.dtype).contiguous()
    if summary.get("kl_uniform") is not None:
        for e in entries.values():
            e["kl_uniform"], e["kl_greedy"] = summary["kl_uniform"], summary["kl_greedy"]
    return entries, tensors
