"""Streaming activation histograms and their inverse CDF (calibration statistics)."""

from __future__ import annotations

import torch

__all__ = ["Histogram"]


class Histogram:
    """A fixed-range histogram of one activation, fed batch by batch.

    The range is fixed from the first batch to its central 98% (1st to 99th percentile),
    widened by 50% on each side; values outside land in the edge bins ("tails clipped",
    as TEAL does). Thresholds for sparsities up to ~96% fall well inside the range.

    ``signed=True`` histograms ``x`` (TEAL: ``t = F^-1(0.5 + p/2)``); ``signed=False``
    histograms ``|x|`` (CATS: ``t = F^-1(p)``).
    """

    def __init__(self, signed: bool, bins: int = 4096, sample: int = 1 << 16):
        self.signed = signed
        self.bins = bins
        self.sample = sample
        self.lo: float | None = None
        self.hi: float | None = None
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.n = 0
        self.nan = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if not self.signed:
            x = x.abs()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nan += int((~finite).sum())
            x = x[finite]
        if x.numel() == 0:
            return
        if self.lo is None:
            s = x if x.numel() <= self.sample else x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: self.sample]]
            q = torch.quantile(s, torch.tensor([0.01, 0.99]))
            lo, hi = float(q[0]), float(q[1])
            span = max(hi - lo, 1e-12)
            self.lo = lo - 0.5 * span if self.signed else 0.0
            self.hi = hi + 0.5 * span
        idx = ((x - self.lo) / (self.hi - self.lo) * self.bins).floor().clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).double()
        self.n += x.numel()

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def cdf(self, v: float) -> float:
        """Fraction of values <= v (linear inside a bin)."""
        if self.n == 0:
            raise ValueError("empty histogram: no calibration data reached this site")
        pos = (v - self.lo) / (self.hi - self.lo) * self.bins
        if pos <= 0:
            return 0.0
        if pos >= self.bins:
            return 1.0
        i = int(pos)
        below = float(self.counts[:i].sum())
        return (below + float(self.counts[i]) * (pos - i)) / self.n

    def icdf(self, q: float) -> float:
        """The value v with ``cdf(v) = q`` (linear interpolation inside a bin)."""
        if self.n == 0:
            raise ValueError("empty histogram: no calibration data reached this site")
        q = min(max(q, 0.0), 1.0)
        cum = torch.cumsum(self.counts, 0) / self.n
        i = int(torch.searchsorted(cum, torch.tensor(q, dtype=torch.float64)).clamp(max=self.bins - 1))
        prev = float(cum[i - 1]) if i > 0 else 0.0
        width = (self.hi - self.lo) / self.bins
        inside = (q - prev) / max(float(cum[i]) - prev, 1e-300)
        return self.lo + width * (i + min(max(inside, 0.0), 1.0))

    # -- thresholds ----------------------------------------------------------------------------
    def threshold(self, sparsity: float) -> float:
        """The threshold that drops about ``sparsity`` of the values by magnitude."""
        if sparsity <= 0:
            return 0.0
        if self.signed:
            return max(self.icdf(0.5 + sparsity / 2), 0.0)  # TEAL: t_p = F^-1(0.5 + p/2)
        return self.icdf(sparsity)  # CATS: the p-quantile of |a|

    def measured_sparsity(self, threshold: float) -> float:
        """Fraction of calibration values with ``|x| <= threshold`` (what the mask drops)."""
        if self.signed:
            return self.cdf(threshold) - self.cdf(-threshold)
        return self.cdf(threshold)
