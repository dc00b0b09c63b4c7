"""The recipe section of the R-Sparse pass (``passes.rsparse``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparsec.errors import RecipeError, did_you_mean

__all__ = ["RSparseConfig", "SEARCHES"]

#: "greedy": per-layer (alpha, rank, threshold) search, then density moved between layers by
#: each layer's predicted effect on the model's next-token KL (kept only if the model's KL on
#: held-out tokens is lower than with every layer at ``density``); "layer": the per-layer
#: search at ``density`` everywhere; "fixed": ``alpha`` for every layer, ``density`` everywhere
SEARCHES = ("greedy", "layer", "fixed")


@dataclass
class RSparseConfig:
    #: the fraction of the dense linear's weight bytes the rewritten linear reads per token
    #: (sparse rows + low-rank factors together), in (0, 1]
    density: float = 0.5
    #: how (alpha, rank, threshold) are chosen: "greedy", "layer" or "fixed" (``SEARCHES``)
    search: str = "greedy"
    #: "fixed" only: the share of the budget spent on sparse channels, in [0, 1] (1: no rank)
    alpha: float = 0.5
    #: module-path patterns to rewrite (empty: every linear with parameter weights)
    targets: list[str] = field(default_factory=list)
    #: module-path patterns never to rewrite; the tied lm_head stays dense by default
    ignore: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens", "embed", "wte", "wpe"])
    #: calibration tokens kept per layer for the search (spread evenly over the batches)
    tokens: int = 512
    #: alpha grid of the per-layer search: 0, 1/steps, ..., 1
    alpha_steps: int = 10
    #: greedy: densities a layer may take, ``density +- spread`` in steps of ``greedy_step``
    greedy_spread: float = 0.2
    greedy_step: float = 0.05
    #: greedy: calibration batches held out to score the allocation on
    greedy_batches: int = 1

    def validate(self) -> None:
        if not isinstance(self.density, (int, float)) or isinstance(self.density, bool) or math.isnan(self.density) \
                or not (0.0 < self.density <= 1.0):
            raise RecipeError(f"density must be in (0, 1] (the fraction of weight bytes read per token), "
                              f"got {self.density!r}")
        if self.search not in SEARCHES:
            raise RecipeError(f"search must be one of {list(SEARCHES)}, got {self.search!r}"
                              f"{did_you_mean(str(self.search), SEARCHES)}")
        if not isinstance(self.alpha, (int, float)) or math.isnan(self.alpha) or not (0.0 <= self.alpha <= 1.0):
            raise RecipeError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.search != "fixed" and self.alpha != 0.5:
            raise RecipeError(f"alpha applies to search 'fixed'; search {self.search!r} chooses alpha per layer")
        for k, lo in (("tokens", 1), ("alpha_steps", 1), ("greedy_batches", 0)):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise RecipeError(f"{k} must be an integer >= {lo}, got {v!r}")
        if not (0.0 <= self.greedy_spread < 1.0):
            raise RecipeError(f"greedy_spread must be in [0, 1), got {self.greedy_spread!r}")
        if not (0.0 < self.greedy_step <= 0.5):
            raise RecipeError(f"greedy_step must be in (0, 0.5], got {self.greedy_step!r}")
