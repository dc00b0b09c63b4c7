"""Deprecated name of ``sparsec.passes.nm`` (the N:M weights family, now a folder: ``config``,
``prune``, ``calibration``, ``pass_``, ``dense_form``). Kept so that imports of this module keep
working; it registers nothing itself."""

from sparsec.passes.nm import METHODS, NMWeights, NMWeightsConfig, sparsegpt_prune, wanda_scores, weight_sample  # noqa: F401
from sparsec.passes.nm.pass_ import _check_checkpoint, _constant  # noqa: F401
from sparsec.passes.nm.prune import _mask  # noqa: F401

__all__ = ["NMWeightsConfig", "NMWeights", "sparsegpt_prune", "wanda_scores"]
