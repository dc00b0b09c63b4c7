"""Fingerprints of the weights a plan was made from.

A pass whose plan holds tensors derived from a weight (N:M's pruned values, R-Sparse's SVD
factors) records a sample of that weight in the entry, and checks it at compile time: applied
to another checkpoint of the architecture (a fine-tune, say), the plan would silently run
the calibrated one's weights. Together with ``GraphContext.pin_weight`` (the compiled code
refuses a weight that changes later) this keeps "a compiled graph runs the weights of the
model it is called with, or refuses loudly"."""

from __future__ import annotations

import torch

from ..errors import PlanError
from ..passbase import GraphContext

__all__ = ["weight_sample", "check_weight_sample"]


def weight_sample(w: torch.Tensor, k: int = 16) -> list[float]:
    """``k`` values of ``w`` at fixed, spread-out flat positions: a fingerprint of the dense
    weight a plan's tensors were made from."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    # integer positions, the same on every machine and torch version (a float linspace rounds
    # differently above 2^24 elements)
    idx = sorted({i * (n - 1) // (k - 1) for i in range(k)}) if n else []
    return [float(v) for v in flat[torch.tensor(idx, dtype=torch.long)].float().cpu()]


def check_weight_sample(ctx: GraphContext, key: str, entry: dict, what: str) -> None:
    """``PlanError`` if the model's weight of ``entry["weights"]["weight"]`` is not the one
    whose sample the entry recorded (``what``: the plan's tensors, for the message)."""
    want = entry.get("weight_sample")
    w = ctx.tensors.get(entry["weights"]["weight"])
    if want is None or w is None or w.device.type == "meta" or isinstance(w, torch._subclasses.FakeTensor):
        return  # a plan from before fingerprints, or no concrete weight to compare
    got = weight_sample(w)
    # the plan's sample in the model's dtype: a bf16 copy of the calibrated fp32 model matches
    want = [float(v) for v in torch.tensor(want, dtype=torch.float64).to(w.dtype).float()]
    if got != want:
        raise PlanError(f"the plan's {what} for {key!r} were made from another checkpoint: the model's "
                        f"weight differs from the one calibrated (e.g. {got[0]:.6g} vs {want[0]:.6g} at its "
                        "first element). Calibrate this model: sparsec.calibrate(model, batches, recipe)")
