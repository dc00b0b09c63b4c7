"""The built-in kernels plugin: registers sparsec's own custom ops and their references."""

from __future__ import annotations

import torch

from sparsec.hookspecs import hookimpl

from . import activation


@hookimpl
def sparsec_register_kernels(register):
    register(
        torch.ops.sparsec.threshold_linear.default,
        reference=activation.threshold_linear_reference,
        description="TEAL: W s_t(x) + b",
    )
    register(
        torch.ops.sparsec.cats_mlp.default,
        reference=activation.cats_mlp_reference,
        description="CATS: W_down (CATS_t(act(W_gate x)) * W_up x)",
    )
