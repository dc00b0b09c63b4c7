"""Activation-sparsity ops: thresholded linear (TEAL) and the CATS gated MLP.

Each op is a ``torch.library.custom_op`` so that Inductor and ``torch.export`` treat it as
one opaque node, with a plain-torch ``*_reference`` beside it. The reference *is* the CPU
implementation for now: it gives exactly the masked-dense result that the fast C++ and
Triton kernels (a later issue) are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "threshold_reference",
    "threshold_linear_reference",
    "cats_mlp_reference",
    "ACTIVATIONS",
]

#: Gate activations CATS recognises, by the name the op takes.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda a: F.gelu(a),
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "relu": F.relu,
}


def threshold_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s_t(x) = x * 1[|x| > t]``.

    ``torch.where`` rather than a multiply by the mask: a multiply turns ``inf * 0`` into NaN
    for dropped entries, and a NaN input must stay NaN (``|NaN| > t`` is false, so ``where``
    would drop it: we keep NaN explicitly so bad inputs are never hidden).
    """
    keep = (x.abs() > threshold) | torch.isnan(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def threshold_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """TEAL: ``y = W s_t(x) + b``."""
    return F.linear(threshold_reference(x, threshold), weight, bias)


def cats_mlp_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    threshold: float,
    activation: str,
) -> torch.Tensor:
    """CATS: ``W_down (CATS_t(act(W_gate x)) * (W_up x))``."""
    a = ACTIVATIONS[activation](F.linear(x, gate_weight, gate_bias))
    h = threshold_reference(a, threshold) * F.linear(x, up_weight, up_bias)
    return F.linear(h, down_weight, down_bias)


# ---- the ops --------------------------------------------------------------------------------
# mutates_args=() and a fresh output: the ops are pure, so Inductor may reorder or CSE them.


@torch.library.custom_op("sparsec::threshold_linear", mutates_args=())
def threshold_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    return threshold_linear_reference(x, weight, bias, threshold)


@threshold_linear.register_fake
def _(x, weight, bias, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sparsec::cats_mlp", mutates_args=())
def cats_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    threshold: float,
    activation: str,
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsec::cats_mlp: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    return cats_mlp_reference(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold, activation
    )


@cats_mlp.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold, activation):
    return x.new_empty((*x.shape[:-1], down_weight.shape[0]))
