"""R-Sparse's search: per layer, the split of a bytes budget between sparse channels and rank
(and the threshold that gives that many channels); across layers, the budget itself.

Pure functions of a layer's SVD and its calibration inputs, called by the pass and by tests.

**The error of a choice, in closed form.** With ``W = U S V^T`` and the complement
``x_c = x (1 - m)``, the rewritten linear misses ``(W - W_r) x_c = sum_{j >= r} u_j S_j v_j^T x_c``
(the sparse channels are exact), so over calibration tokens ``X`` (``[T, in]``)::

    err(m, r) = sum_{j >= r} S_j^2 ||(X_c V)[:, j]||^2

One matmul ``X_c V`` per mask gives the error of *every* rank at once (a suffix sum), so the
search tries a grid of channel counts ``k`` (the mask follows from ``k``: the threshold that
leaves ``k`` channels per token active on average) and, for each budget, gives the rest of the
bytes to rank. Errors are relative to ``||X W^T||^2``, the dense output's energy.

**The budget.** A layer ``[out, in]`` at density ``d`` may read ``d in out`` weights per token:
``k out`` for the active rows of ``W^T``, ``r (in + out)`` for the factors (the paper's count;
the kernel reads ``(in - k) r + r out``, less). ``alpha = k out / (d in out)`` is the share of
the sparse channels; ``r = floor((d in out - k out) / (in + out))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LayerSVD", "Choice", "layer_svd", "rank_for", "threshold_for", "channel_grid", "choices",
           "best_choice", "fixed_choice", "planned_weights", "FLT_MAX", "NONE_ACTIVE", "ALL_ACTIVE"]

#: thresholds that leave no channel / every channel active (finite: plans are JSON)
FLT_MAX = float(torch.finfo(torch.float32).max)
NONE_ACTIVE, ALL_ACTIVE = FLT_MAX, -1.0


@dataclass
class LayerSVD:
    """One layer's decomposition and calibration inputs, in float32 (the SVD made in float64)."""

    scale: torch.Tensor  # [in]: ||W[:, i]||_2
    v: torch.Tensor  # [in, q]: right singular vectors, q = min(in, out)
    s: torch.Tensor  # [q]: singular values, descending
    u: torch.Tensor  # [out, q]
    x: torch.Tensor  # [T, in]: calibration inputs
    scores: torch.Tensor  # [T, in]: |x| * scale
    energy: float  # ||X W^T||^2

    @property
    def in_features(self) -> int:
        return int(self.v.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.u.shape[0])


@dataclass(frozen=True)
class Choice:
    """What one layer runs: ``channels`` active per token on average (threshold ``threshold``),
    rank ``rank``, under the budget ``density``; ``error``: relative output error on the
    calibration tokens."""

    density: float
    channels: int
    rank: int
    threshold: float
    error: float

    def alpha(self, in_f: int, out_f: int) -> float:
        budget = self.density * in_f * out_f
        return self.channels * out_f / budget if budget > 0 else 0.0


def layer_svd(weight: torch.Tensor, x: torch.Tensor) -> LayerSVD:
    """The SVD of ``weight`` (in float64, kept in float32) and the scores of the inputs ``x``."""
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    x = x.detach().float()
    scale = w.norm(dim=0).float()
    energy = float(((x.double() @ w.t()) ** 2).sum())
    return LayerSVD(scale=scale, v=vh.t().float().contiguous(), s=s.float(), u=u.float(), x=x,
                    scores=x.abs() * scale, energy=energy)


def rank_for(in_f: int, out_f: int, density: float, channels: int) -> int:
    """The rank the rest of the budget pays for: ``floor((d in out - k out) / (in + out))``,
    within ``[0, min(in, out)]``."""
    left = density * in_f * out_f - channels * out_f
    # a hair of slack so that d in out computed in floating point does not lose a whole rank
    return max(0, min(min(in_f, out_f), math.floor(left / (in_f + out_f) + 1e-9)))


def threshold_for(scores: torch.Tensor, channels: int) -> float:
    """The threshold that leaves ``channels`` of a token's inputs active on average: the
    ``channels * T``-th largest score (strictly greater ones are active)."""
    t_count, n = scores.shape
    if channels <= 0:
        return NONE_ACTIVE
    if channels >= n:
        return ALL_ACTIVE
    flat = scores.reshape(-1)
    keep = channels * t_count
    return float(torch.kthvalue(flat, flat.numel() - keep).values)


def channel_grid(in_f: int, steps: int) -> list[int]:
    """Channel counts the search tries: ``0, in/steps, ..., in``."""
    return sorted({round(i * in_f / steps) for i in range(steps + 1)})


def _complement_energies(svd: LayerSVD, threshold: float) -> torch.Tensor:
    """``S_j^2 ||(X_c V)[:, j]||^2`` for each singular direction ``j``."""
    xc = torch.where(svd.scores > threshold, torch.zeros((), dtype=svd.x.dtype), svd.x)
    return (xc @ svd.v).pow(2).sum(0).double() * svd.s.double().pow(2)


def choices(svd: LayerSVD, densities: list[float], grid: list[int]) -> dict[float, Choice]:
    """The best choice at each density: for every channel count of ``grid`` that fits the
    budget, the threshold giving it, the rank the rest pays for, and the closed-form error;
    the smallest error wins (ties: the fewer channels)."""
    in_f, out_f = svd.in_features, svd.out_features
    total = max(svd.energy, 1e-300)
    best: dict[float, Choice] = {}
    for k in grid:
        fits = [d for d in densities if k * out_f <= d * in_f * out_f + 1e-9]
        if not fits:
            continue
        t = threshold_for(svd.scores, k)
        tail = _complement_energies(svd, t).flip(0).cumsum(0).flip(0)  # tail[r] = sum_{j >= r}
        tail = torch.cat([tail, tail.new_zeros(1)])
        for d in fits:
            r = rank_for(in_f, out_f, d, k)
            c = Choice(density=d, channels=k, rank=r, threshold=t, error=float(tail[r]) / total)
            if d not in best or c.error < best[d].error - 1e-15:
                best[d] = c
    return best


def best_choice(svd: LayerSVD, density: float, steps: int) -> Choice:
    """The per-layer search at one density."""
    return choices(svd, [density], channel_grid(svd.in_features, steps))[density]


def fixed_choice(svd: LayerSVD, density: float, alpha: float) -> Choice:
    """``alpha`` of the budget to channels, the rest to rank."""
    in_f = svd.in_features
    k = min(in_f, math.floor(alpha * density * in_f + 1e-9))
    return choices(svd, [density], [k])[density]


def planned_weights(in_f: int, out_f: int, c: Choice) -> int:
    """Weights a token reads by the budget's count: ``k out + r (in + out)``."""
    return c.channels * out_f + c.rank * (in_f + out_f)
