"""Deprecated: the generated Triton kernels moved. The shared machinery (site specs,
rendering, the on-disk cache, the fused epilogue, AOT compilation, the graph swap) is
``sparsec.kernels._triton``; each family's templates, launchers and ``triton_op`` twins are in
its own folder: ``sparsec.kernels.activation.triton`` (``sparse_linear``, ``sparse_cats_mlp``)
and ``sparsec.kernels.nm.triton`` (``nm_linear``). This module keeps every name it had, for
older code (the imports below and ``MOVED`` say where each one lives now); new code imports
those modules."""

from __future__ import annotations

import torch

from ._triton import aot_compile, available, generate, runtime, source, spec, use_triton_ops
from .activation import triton as activation_triton
from .activation.triton import CONFIGS, sparse_cats_mlp_cuda, sparse_linear_cuda
from .nm import triton as nm_triton

__all__ = ["SiteSpec", "generate", "sparse_linear_cuda", "sparse_cats_mlp_cuda", "aot_compile", "CONFIGS",
           "available", "use_triton_ops", "TRITON_TWINS"]

#: the module's other old names -> (module each lives in now, its name there)
MOVED = {
    "MAX_BATCH": (spec, "MAX_BATCH"), "_interpret": (spec, "_interpret"), "_cuda_arch": (spec, "_cuda_arch"),
    "_TL_DTYPE": (source, "TL_DTYPE"), "_PTR": (source, "PTR"), "_HEADER": (source, "HEADER"),
    "_EPILOGUE": (source, "EPILOGUE"), "_configs": (source, "autotune_configs"), "_dot": (source, "dot"),
    "render": (source, "render"), "_cache_dir": (source, "_cache_dir"), "_MODULES": (source, "_MODULES"),
    "_declare_kernels": (source, "_declare_kernels"),
    "_launch": (runtime, "launch"), "triton_cdiv": (runtime, "triton_cdiv"), "_epilogue": (runtime, "run_epilogue"),
    "_gemv_rows": (runtime, "small_batch"),
    "CATS_CONFIGS": (activation_triton, "CATS_CONFIGS"), "_ACT": (activation_triton, "ACT"),
    "_GEMV": (activation_triton, "_GEMV"), "_CATS_UP": (activation_triton, "_CATS_UP"),
    "prepare_site": (activation_triton, "prepare_site"), "_grid_gemv": (activation_triton, "_grid_gemv"),
    "_gemv": (activation_triton, "_gemv"),
    "triton_sparse_linear": (activation_triton, "triton_sparse_linear"),
    "triton_sparse_cats_mlp": (activation_triton, "triton_sparse_cats_mlp"),
    "_NM": (nm_triton, "_NM"), "NM_CONFIGS": (nm_triton, "NM_CONFIGS"), "nm_linear_cuda": (nm_triton, "nm_linear_cuda"),
    "triton_nm_linear": (nm_triton, "triton_nm_linear"),
}
globals().update({old: getattr(module, new) for old, (module, new) in MOVED.items()})

#: op -> its triton_op twin, for the ops this module had: fixed, not whatever families happen to
#: be imported first (``use_triton_ops`` reads the registry, ``spec.registered_ops()``)
TRITON_TWINS = {op: spec.registered(op).twin for op in activation_triton.OPS + nm_triton.OPS}


def SiteSpec(op: str, dtype: torch.dtype, k: int, n: int, inter: int = 0, has_bias: bool = False,
             has_residual: bool = False, up_bias: bool = False, activation: str = "",
             nm: tuple[int, int] = (0, 0)) -> spec.SiteSpec:
    """The old all-families spec's signature; returns the family's spec for ``op``
    (``activation.triton.CatsSpec``, ``nm.triton.NMSpec``, else ``_triton.SiteSpec``)."""
    if op == "sparse_cats_mlp":
        return activation_triton.CatsSpec(op, dtype, k, n, has_bias=has_bias, has_residual=has_residual, inter=inter,
                                          up_bias=up_bias, activation=activation)
    if op == "nm_linear":
        return nm_triton.NMSpec(op, dtype, k, n, has_bias=has_bias, has_residual=has_residual, nm=nm,
                                thresholded=activation == "threshold")
    return spec.SiteSpec(op, dtype, k, n, has_bias=has_bias, has_residual=has_residual)


def _signatures(site: spec.SiteSpec) -> dict[str, dict[str, str]]:
    """Each kernel of ``site``'s module -> its AOT signature."""
    return {kname: sig for kname, (sig, _) in spec.registered(site.op).aot(site, spec.current_arch()).items()}
