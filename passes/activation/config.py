"""The recipe section of the activation-thresholding pass (``passes.activation_threshold``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparsec.errors import RecipeError

__all__ = ["ActivationThresholdConfig", "MAX_BINS"]


#: the most histogram bins a site may ask for: 2^20 float64 bins are 8 MiB per site, and
#: more resolution than that is below the sampling noise of any calibration set
MAX_BINS = 1 << 20


@dataclass
class ActivationThresholdConfig:
    #: "teal": threshold the input of every matched linear; "cats": threshold the gated-MLP activation
    mode: str = "teal"
    #: target sparsity in [0, 1): the fraction of activation entries set to zero
    sparsity: float = 0.5
    #: "greedy" (TEAL's block-wise search, needs the model at calibration) or "uniform"
    allocation: str = "greedy"
    #: module-path patterns to rewrite (empty: all that match the graph pattern)
    targets: list[str] = field(default_factory=list)
    #: module-path patterns never to rewrite; the tied lm_head stays dense by default
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    #: histogram bins per site, 16 to MAX_BINS
    bins: int = 4096
    #: greedy: how much one step raises the size-weighted average sparsity of a block
    greedy_step: float = 0.025
    #: greedy: calibration batches held out from the histograms to score the steps on
    greedy_batches: int = 1
    #: greedy: no group is pushed beyond this sparsity
    max_sparsity: float = 0.95
    #: greedy: "block" (TEAL: every block at the target) or "model" (blocks may differ by up to
    #: ``greedy_spread``, traded by each block's measured effect on the model's output)
    greedy_scope: str = "block"
    #: greedy, scope "model": how far a block's average may move from the target
    greedy_spread: float = 0.2

    def validate(self) -> None:
        if self.mode not in ("teal", "cats"):
            raise RecipeError(f"mode must be 'teal' or 'cats', got {self.mode!r}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in ("greedy", "uniform"):
            raise RecipeError(f"allocation must be 'greedy' or 'uniform', got {self.allocation!r}")
        if self.mode == "cats" and self.allocation == "greedy":
            # CATS has one site per MLP: greedy has nothing to trade off within a block
            self.allocation = "uniform"
        if self.bins < 16:
            raise RecipeError(f"bins must be at least 16, got {self.bins}")
        if self.bins > MAX_BINS:  # 8 bytes a bin per probe: 10^9 bins allocated 8 GB per site
            raise RecipeError(f"bins must be at most {MAX_BINS} ({MAX_BINS * 8 >> 20} MiB per site), got {self.bins}")
        if not (self.greedy_step > 0):
            raise RecipeError(f"greedy_step must be positive, got {self.greedy_step}")
        if self.greedy_scope not in ("block", "model"):
            raise RecipeError(f"greedy_scope must be 'block' or 'model', got {self.greedy_scope!r}")
        if not (0 <= self.greedy_spread < 1):
            raise RecipeError(f"greedy_spread must be in [0, 1), got {self.greedy_spread}")
        if self.greedy_batches < 0:
            raise RecipeError(f"greedy_batches must not be negative, got {self.greedy_batches}")
        if not (0.0 < self.max_sparsity < 1.0):
            raise RecipeError(f"max_sparsity must be in (0, 1), got {self.max_sparsity}")
        if self.sparsity > self.max_sparsity:
            raise RecipeError(f"sparsity {self.sparsity} exceeds max_sparsity {self.max_sparsity}")
