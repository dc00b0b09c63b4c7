"""Launching generated kernels: :func:`launch` (``wrap_triton``), grid arithmetic, the shared
fused epilogue, and the batch test every family's ``triton_op`` twin makes before it takes
the generated path."""

from __future__ import annotations

import torch

from .source import TL_DTYPE
from .spec import MAX_BATCH

__all__ = ["launch", "triton_cdiv", "EPILOGUE_BLOCK", "run_epilogue", "small_batch"]

#: elements per program of the fused epilogue (its AOT configuration uses the same)
EPILOGUE_BLOCK = 1024


def launch(kernel):
    """``wrap_triton(kernel)``: launches it directly when called eagerly; inside the families'
    ``triton_op`` twins, traced by Inductor / torch.export as a user-defined Triton kernel
    (the ``triton_kernel_wrapper_functional`` node) instead of an opaque call."""
    return torch.library.wrap_triton(kernel)


def triton_cdiv(a, b):
    return (a + b - 1) // b


def run_epilogue(mod, acc, bias, residual, dtype):
    """``y = cast(acc + bias + residual)`` by the module's ``epilogue`` kernel (``epilogue_source``)."""
    y = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    total = acc.numel()
    block = EPILOGUE_BLOCK
    launch(mod.epilogue)[(triton_cdiv(total, block),)](acc, bias if bias is not None else acc,
                                                       residual if residual is not None else acc, y, total,
                                                       BLOCK=block)
    return y


def small_batch(x: torch.Tensor) -> bool:
    """Whether ``x`` (rows = all but its last dimension) is what the generated GEMVs take:
    1 to ``MAX_BATCH`` rows of a dtype the templates render."""
    rows = x.numel() // max(x.shape[-1], 1)
    return 0 < rows <= MAX_BATCH and x.dtype in TL_DTYPE
