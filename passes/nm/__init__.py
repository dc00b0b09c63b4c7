"""N:M weight sparsity: ``aten.linear(x, W, b)`` -> ``sparsec::nm_linear(x, values, positions, b, n, m, -1)``.

Every linear with a 2-D parameter weight whose input size ``m`` divides is a site (module-path
``targets``/``ignore``; the lm_head and embeddings are ignored by default). Masks keep ``n`` of
every ``m`` consecutive inputs of each output row, chosen by

- ``magnitude``: ``|W_ij|``;
- ``wanda``: ``|W_ij| * ||X_j||_2`` (``X_j``: input feature j over the calibration tokens);
- ``sparsegpt``: the OBS update of ALGORITHMS.md (damped Hessian ``X X^T``, upper Cholesky
  factor of its inverse, blocks of ``blocksize`` columns, mask chosen inside each block by
  ``w^2 / Hinv_jj^2``, error propagated to later columns), block by block through the model on
  the outputs of the already-pruned blocks, one layer's Hessian in memory at a time.

``structure: unstructured`` keeps the top ``1 - sparsity`` of each output row instead (a
masked dense weight: no kernel speedup, for quality comparisons).

The compressed weights (values + packed positions, ``sparsec.kernels.nm``) live in the plan;
the user's model is never modified. With ``activation_threshold`` (TEAL) in the same recipe,
the thresholded linear becomes one fused ``nm_linear`` with the threshold.

Example recipe::

    {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "sparsegpt"}}}
"""

from __future__ import annotations

import torch

from sparsec.hookspecs import hookimpl

from .config import METHODS, NMWeightsConfig
from .dense_form import nm_linear_dense_form
from .pass_ import NMWeights, weight_sample
from .prune import sparsegpt_prune, wanda_scores

__all__ = ["NMWeightsConfig", "NMWeights", "sparsegpt_prune", "wanda_scores", "weight_sample", "METHODS", "RECIPES"]

_PASS = NMWeights()



@hookimpl
def sparsec_register_passes(register):
    register(_PASS)



@hookimpl
def sparsec_register_kernels(register):
    from sparsec.kernels import nm

    register(torch.ops.sparsec.nm_linear.default, reference=nm.nm_linear_reference,
             description="N:M compressed weights (values + packed positions), optional TEAL threshold")


@hookimpl
def sparsec_register_onnx_translations(register):
    from sparsec.kernels.nm.onnx import TRANSLATIONS

    for name, fn in TRANSLATIONS.items():
        register(getattr(torch.ops.sparsec, name).default, fn)


@hookimpl
def sparsec_register_lowerings(register):
    from sparsec.codegen import Lowering

    # nm_linear runs as emitted (its compressed weights are the plan's); it adds a residual in
    # its epilogue, and on CUDA becomes its triton_op twin (sparsec.kernels.nm.triton)
    register("sparsec::nm_linear", Lowering(epilogue="residual", triton=_use_triton_ops))


def _use_triton_ops(gm) -> int:
    """``Lowering.triton`` of ``nm_linear``: its CUDA nodes become its ``triton_op`` twin."""
    from sparsec.kernels.nm import triton as kernels  # registers the family's twin

    return kernels.use_triton_ops(gm) if kernels.available() else 0



#: named recipes of this family (``sparsec recipes`` lists them)
RECIPES = {
    "magnitude-24": ("2:4 weights by magnitude (no calibration data used)", {"n": 2, "m": 4, "method": "magnitude"}),
    "wanda-24": ("2:4 weights, Wanda scores |W| ||X||", {"n": 2, "m": 4, "method": "wanda"}),
    "sparsegpt-24": ("2:4 weights, SparseGPT (OBS updates, block by block)", {"n": 2, "m": 4, "method": "sparsegpt"}),
}



@hookimpl
def sparsec_register_recipes(register):
    for name, (desc, section) in RECIPES.items():
        register(name, {"passes": {"nm_weights": section}}, description=desc)
    register("sparsegpt-24-teal-40",
             {"passes": {"nm_weights": RECIPES["sparsegpt-24"][1],
                         "activation_threshold": {"mode": "teal", "sparsity": 0.40}}},
             description="2:4 SparseGPT weights and TEAL 40% inputs, fused into one op per linear")



@hookimpl
def sparsec_register_dense_forms(register):
    register(torch.ops.sparsec.nm_linear.default, nm_linear_dense_form)
