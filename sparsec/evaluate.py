"""Perplexity of dense and sparse models on real text (``sparsec eval``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["perplexity", "EvalResult", "evaluate_recipe", "sparse_model"]


def _logits(out):
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


@torch.no_grad()
def perplexity(fn: Callable, windows: list[torch.Tensor], progress: bool = False, desc: str = "perplexity") -> float:
    """``exp(mean next-token NLL)`` over all windows (each ``(1, L)`` or ``(B, L)`` token ids)."""
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    for ids in tqdm(windows, desc=desc, disable=not progress, leave=False):
        logits = _logits(fn(ids)).float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def sparse_model(model, plan, dense_backend: str = "eager"):
    """The model compiled by sparsec with ``plan``. ``eager`` skips Inductor: the same rewritten
    ATen graph, minutes faster to set up, for quality measurements."""
    return torch.compile(model, backend="sparsec", options={"plan": plan, "dense_backend": dense_backend})


@dataclass
class EvalResult:
    recipe: str
    dense_ppl: float
    sparse_ppl: float
    windows: int
    window_length: int
    seconds: float

    @property
    def delta(self) -> float:
        return self.sparse_ppl / self.dense_ppl - 1.0

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "dense_ppl": self.dense_ppl, "sparse_ppl": self.sparse_ppl,
                "relative_increase": self.delta, "windows": self.windows, "window_length": self.window_length,
                "seconds": round(self.seconds, 1)}


def evaluate_recipe(model, tokenizer, recipe, *, plan=None, windows: int = 8, window_length: int = 512,
                    calib_windows: int = 16, calib_length: int = 128, dense_ppl: float | None = None,
                    progress: bool = True) -> EvalResult:
    """Calibrate (unless a plan is given) on the calibration windows, then measure sparse and
    dense perplexity on the evaluation windows.

    The sparse model runs first: compiling it checks the plan against the model, so a plan
    made for another model fails (``PlanError``) on the first window instead of after the
    whole dense evaluation."""
    import sparsec
    from sparsec.models.data import calibration_windows, evaluation_windows

    t0 = time.time()
    ev = evaluation_windows(tokenizer, windows, window_length)
    if plan is None:
        plan = sparsec.calibrate(model, calibration_windows(tokenizer, calib_windows, calib_length, batch=4),
                                 recipe, progress=progress)
    sparse = perplexity(sparse_model(model, plan), ev, progress, "sparse perplexity")
    if dense_ppl is None:
        dense_ppl = perplexity(model, ev, progress, "dense perplexity")
    name = plan.recipe.get("name", str(recipe))
    return EvalResult(name, dense_ppl, sparse, len(ev), window_length, time.time() - t0)
