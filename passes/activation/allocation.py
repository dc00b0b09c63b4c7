"""TEAL's greedy block-wise allocation and its model-scope variant: pure functions of the
histograms, the sites and a scorer (``sparsec.calibrate``'s block scorer), called by the pass
and by tests directly."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

from sparsec.passbase import Site

from .config import ActivationThresholdConfig

__all__ = ["greedy_allocation"]


def _block_path(groups, hists, config, scorer, block, stop: float) -> list[tuple[float, dict, float]]:
    """TEAL's greedy walk in one block from 0 to average ``stop``: ``[(average, sparsities,
    block error)]`` after every step (the first entry is all-dense)."""
    size = {g: sum(s.weight_bytes for s in members) for g, members in groups.items()}
    total = sum(size.values())
    w = {g: size[g] / total for g in groups}
    sp = {g: 0.0 for g in groups}

    def thresholds(spars):
        return {s.key: hists[g].threshold(spars[g]) for g, members in groups.items() for s in members}

    path = [(0.0, dict(sp), 0.0)]
    avg = 0.0
    while avg < stop - 1e-9:
        step = min(config.greedy_step, stop - avg)
        best, best_err = None, math.inf
        for g in groups:
            cand = sp[g] + step / w[g]
            if cand > config.max_sparsity:
                continue
            err = scorer(block, thresholds(dict(sp, **{g: cand})))
            if err < best_err:
                best, best_err = g, err
        if best is None:  # every group at its cap: spread what is left uniformly
            for g in groups:
                sp[g] = min(config.max_sparsity, sp[g] + (stop - avg))
            avg = sum(w[g] * sp[g] for g in groups)
            path.append((avg, dict(sp), scorer(block, thresholds(sp))))
            break
        sp[best] += step / w[best]
        avg = sum(w[g] * sp[g] for g in groups)
        path.append((avg, dict(sp), best_err))
    return path


def greedy_allocation(
    sites: list[Site],
    config: ActivationThresholdConfig,
    hists: dict,
    scorer: Callable[[str, dict[str, float]], float],
) -> dict[str, float]:
    """Per-group sparsities, block by block (TEAL, arXiv 2408.14690, section 4.2).

    In each block all groups start at 0. A step raises one group's sparsity by
    ``greedy_step / w_g`` (``w_g``: that group's share of the block's weight bytes), so every
    candidate raises the block's size-weighted average by the same ``greedy_step``; the step
    kept is the one that least increases ``||Y_dense - Y_sparse||`` of the block's output
    (``scorer(block, {site key: threshold})``) on held-out tokens. Stop at the target average.

    ``greedy_scope="model"`` also lets blocks differ: see ``_across_blocks``.
    """
    from tqdm.auto import tqdm

    blocks: dict[str, dict[str, list[Site]]] = defaultdict(lambda: defaultdict(list))
    for s in sites:
        blocks[s.block][s.group].append(s)
    target = config.sparsity
    across = config.greedy_scope == "model" and hasattr(scorer, "model_kl") and len(blocks) > 1
    stop = min(target + config.greedy_spread, config.max_sparsity) if across else target
    show = getattr(scorer, "progress", True)
    paths = {}
    for block in tqdm(list(blocks), desc="sparsec greedy allocation", unit="block", leave=False, disable=not show):
        paths[block] = _block_path(blocks[block], hists, config, scorer, block, stop)
    at_target = {b: min(p, key=lambda e: abs(e[0] - target)) for b, p in paths.items()}
    result: dict[str, float] = {}
    if across:
        chosen = _across_blocks(blocks, paths, at_target, hists, config, scorer)
    else:
        chosen = at_target
    for b, (_, sp, _) in chosen.items():
        result.update(sp)
    return result


def _across_blocks(blocks, paths, at_target, hists, config, scorer) -> dict:
    """Let blocks take different averages (within ``greedy_spread`` of the target).

    Each block's walk gives its output error ``e_b`` at every average; one model-level
    measurement per block (the mean next-token KL with only that block at the target) gives
    its sensitivity ``c_b = KL_b / e_b(target)``. Then, from every block at ``target - spread``,
    steps go to the block whose next step adds the least predicted KL ``c_b * delta e_b``
    until the size-weighted average reaches the target. The result is kept only if the whole
    model's KL on the held-out tokens is lower than with every block at the target.
    """

    def thresholds(choice):
        return {s.key: hists[g].threshold(sp[g]) for b, (_, sp, _) in choice.items()
                for g, members in blocks[b].items() for s in members}

    target, spread = config.sparsity, config.greedy_spread
    size = {b: sum(s.weight_bytes for ms in blocks[b].values() for s in ms) for b in blocks}
    total = sum(size.values())
    sens = {}
    for b, entry in at_target.items():
        kl = scorer.model_kl(thresholds({b: entry}))
        sens[b] = kl / entry[2] if entry[2] > 0 else 0.0
    # start every block at the lowest allowed average
    idx = {b: min(range(len(p)), key=lambda i: abs(p[i][0] - max(0.0, target - spread))) for b, p in paths.items()}
    avg = sum(size[b] * paths[b][idx[b]][0] for b in blocks) / total
    while avg < target - 1e-9:
        best, best_cost = None, math.inf
        for b, p in paths.items():
            i = idx[b]
            if i + 1 >= len(p):
                continue
            cost = sens[b] * (p[i + 1][2] - p[i][2]) / ((p[i + 1][0] - p[i][0]) * size[b] + 1e-30)
            if cost < best_cost:
                best, best_cost = b, cost
        if best is None:
            break
        idx[best] += 1
        avg = sum(size[b] * paths[b][idx[b]][0] for b in blocks) / total
    chosen = {b: paths[b][idx[b]] for b in blocks}
    if scorer.model_kl(thresholds(chosen)) < scorer.model_kl(thresholds(at_target)):
        return chosen
    return at_target
