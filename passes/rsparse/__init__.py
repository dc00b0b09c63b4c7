"""R-Sparse (ICLR 2025): ``aten.linear(x, W, b)`` -> ``sparsec::rsparse_linear(x, W, b, s, V_r, US_r^T, t)``.

Each linear keeps the input channels whose score ``|x_i| ||W[:, i]||`` passes a threshold
(their rows of ``W`` are read exactly) and sends the rest through a rank-``r`` approximation
of ``W`` from its SVD, under a bytes budget: ``density`` is the fraction of the dense weight's
bytes a token may read (sparse rows plus both factors). The split of the budget between
channels and rank, and the threshold, are searched per layer on calibration inputs (closed
form: ``search.py``); ``search: greedy`` also moves density between layers by their effect on
the model's next-token KL. The factors live in the plan (safetensors), the rest in its JSON;
the model's weight is read as it is, and a compile refuses a weight the factors were not made
from.

Example recipe::

    {"passes": {"rsparse": {"density": 0.5, "search": "greedy"}}}
"""

from __future__ import annotations

import torch

from sparsec.hookspecs import hookimpl

from .config import SEARCHES, RSparseConfig
from .pass_ import RSparse

__all__ = ["RSparseConfig", "RSparse", "SEARCHES", "RECIPES"]

_PASS = RSparse()


@hookimpl
def sparsec_register_passes(register):
    register(_PASS)


@hookimpl
def sparsec_register_kernels(register):
    from sparsec.kernels import rsparse

    register(torch.ops.sparsec.rsparse_linear.default, reference=rsparse.rsparse_linear_reference,
             description="R-Sparse: W (x m) + US_r V_r^T (x (1 - m)) + b, m = |x| s > t")
    register(torch.ops.sparsec.rsparse_linear_t.default, reference=rsparse.rsparse_linear_t_reference,
             description="R-Sparse on a prepared (transposed) weight; C++ kernel")


@hookimpl
def sparsec_register_onnx_translations(register):
    from sparsec.kernels.rsparse.onnx import TRANSLATIONS

    for name, fn in TRANSLATIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_decompositions(register):
    from sparsec.kernels.rsparse.mlir import DECOMPOSITIONS

    for name, fn in DECOMPOSITIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_lowerings(register):
    from .lowering import LOWERINGS

    for op, lowering in LOWERINGS.items():
        register(op, lowering)


#: named recipes of this family (``sparsec recipes`` lists them)
RECIPES = {
    "rsparse-50": ("R-Sparse, half the weight bytes per token: sparse channels + low rank, searched per layer, "
                   "density moved between layers by model KL", {"density": 0.5, "search": "greedy"}),
    "rsparse-40": ("R-Sparse, 40% of the weight bytes per token", {"density": 0.4, "search": "greedy"}),
    "rsparse-60": ("R-Sparse, 60% of the weight bytes per token", {"density": 0.6, "search": "greedy"}),
}


@hookimpl
def sparsec_register_recipes(register):
    for name, (desc, section) in RECIPES.items():
        register(name, {"passes": {"rsparse": section}}, description=desc)
