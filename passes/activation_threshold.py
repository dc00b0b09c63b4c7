"""Deprecated name of ``sparsec.passes.activation`` (the activation-thresholding family, now a
folder: ``config``, ``pass_``, ``allocation``, ``lowering``). Kept so that imports of this
module keep working; it registers nothing itself."""

from sparsec.passes.activation import MAX_BINS, ActivationThreshold, ActivationThresholdConfig, greedy_allocation  # noqa: F401
from sparsec.passes.activation.pass_ import _ACT_OPS  # noqa: F401

__all__ = ["ActivationThresholdConfig", "ActivationThreshold", "greedy_allocation"]
