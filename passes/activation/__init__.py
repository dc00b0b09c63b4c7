"""Activation thresholding: TEAL (every linear's input) and CATS (the gated-MLP activation).

Rewrites, on the ATen graph:

- TEAL: ``aten.linear(x, W, b)``  ->  ``sparsec::threshold_linear(x, W, b, t)``, i.e. ``W s_t(x) + b``
  with ``s_t(x) = x * 1[|x| > t]``. Linears that share one input (q/k/v, gate/up) form a group
  and always get one threshold, so one mask serves them all.
- CATS: ``linear(act(linear(x, Wg)) * linear(x, Wu), Wd)``  ->  ``sparsec::cats_mlp(x, Wg, .., Wu, .., Wd, .., t, act)``
  with the activation thresholded: ``Wd (CATS_t(act(Wg x)) * (Wu x))``.

Sites are found from graph patterns, never from module names; ``targets``/``ignore`` filter
by the path of the module that owns the weight. Thresholds come from calibration histograms
(``sparsec.histogram``): TEAL ``t = F^-1(0.5 + p/2)`` on the signed activations, CATS the
``p``-quantile of ``|act|``. ``allocation: greedy`` is TEAL's block-wise greedy search.

Example recipe::

    {"passes": {"activation_threshold": {"mode": "teal", "sparsity": 0.5,
                                         "allocation": "greedy", "ignore": ["lm_head"]}}}
"""

from __future__ import annotations

from sparsec.hookspecs import hookimpl

from .allocation import greedy_allocation
from .config import MAX_BINS, ActivationThresholdConfig
from .pass_ import ActivationThreshold

__all__ = ["ActivationThresholdConfig", "ActivationThreshold", "greedy_allocation", "MAX_BINS", "RECIPES"]

_PASS = ActivationThreshold()



@hookimpl
def sparsec_register_passes(register):
    register(_PASS)



@hookimpl
def sparsec_register_kernels(register):
    import torch

    from sparsec.kernels import activation

    sparsec = torch.ops.sparsec
    register(sparsec.threshold_linear.default, reference=activation.threshold_linear_reference,
             description="TEAL: W s_t(x) + b")
    register(sparsec.cats_mlp.default, reference=activation.cats_mlp_reference,
             description="CATS: W_down (CATS_t(act(W_gate x)) * W_up x)")
    register(sparsec.sparse_linear.default, reference=activation.sparse_linear_reference,
             description="TEAL on a prepared (transposed) weight; C++ / Triton kernels")
    register(sparsec.sparse_cats_mlp.default, reference=activation.sparse_cats_mlp_reference,
             description="CATS on a prepared down weight; C++ / Triton kernels")


@hookimpl
def sparsec_register_onnx_translations(register):
    import torch

    from sparsec.kernels.activation.onnx import TRANSLATIONS

    for name, fn in TRANSLATIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_decompositions(register):
    import torch

    from sparsec.kernels.activation.mlir import DECOMPOSITIONS

    for name, fn in DECOMPOSITIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_lowerings(register):
    from sparsec.passes.activation.lowering import LOWERINGS

    for op, lowering in LOWERINGS.items():
        register(op, lowering)



#: named recipes of this family (``sparsec recipes`` lists them)
RECIPES = {
    "teal-25": ("TEAL, 25% of every block linear's input, greedy per-block allocation", {"mode": "teal", "sparsity": 0.25}),
    "teal-40": ("TEAL, 40%, greedy per-block allocation", {"mode": "teal", "sparsity": 0.40}),
    "teal-50": ("TEAL, 50%, greedy per-block allocation", {"mode": "teal", "sparsity": 0.50}),
    "teal-40-uniform": ("TEAL, 40%, the same sparsity at every linear", {"mode": "teal", "sparsity": 0.40, "allocation": "uniform"}),
    "teal-50-uniform": ("TEAL, 50%, the same sparsity at every linear", {"mode": "teal", "sparsity": 0.50, "allocation": "uniform"}),
    "cats-50": ("CATS, 50% of the gated-MLP activation", {"mode": "cats", "sparsity": 0.50}),
}



@hookimpl
def sparsec_register_recipes(register):
    for name, (desc, section) in RECIPES.items():
        register(name, {"passes": {"activation_threshold": section}}, description=desc)
