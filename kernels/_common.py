"""Kernel helpers every family shares, in a leaf module: it imports torch and the standard
library only, so any ``kernels/<family>`` (and core) may import it without a cycle. The
threshold compare (``threshold_reference``) and the residual epilogue are here because more
than one family runs them (TEAL, N:M with a fused threshold, R-Sparse next)."""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys

import torch

__all__ = ["version_of", "empty_huge", "HUGE_PAGE", "linear_as_mm", "threshold_reference", "scaled_active",
           "add_residual"]

log = logging.getLogger("sparsec.kernels")


def threshold_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s_t(x) = x * 1[|x| > t]``.

    ``torch.where`` rather than a multiply by the mask: a multiply turns ``inf * 0`` into NaN
    for dropped entries, and a NaN input must stay NaN (``|NaN| > t`` is false, so ``where``
    would drop it: we keep NaN explicitly so bad inputs are never hidden).
    """
    # compare in fp32: a bf16 comparison would round the threshold itself to bf16
    xa = x.abs() if x.dtype in (torch.float32, torch.float64) else x.abs().float()
    keep = (xa > threshold) | torch.isnan(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def scaled_active(x: torch.Tensor, scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """The threshold-vector compare: channel ``i`` is active where ``!(|x_i| s_i <= t)``, a bool
    tensor of x's shape. R-Sparse scores inputs by ``|x_i| ||W[:, i]||``; any weight-informed
    threshold is this compare with another ``s``. The product is taken in fp32 (fp64 for fp64
    inputs), once, as the C++ kernels take it (``kernels/csrc/sparsec_common.h``), and written
    as a negated ``<=`` so that a NaN input (or a NaN product) stays active."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    score = x.abs().to(cd) * scale.to(cd)
    return ~(score <= threshold)


def add_residual(y: torch.Tensor, residual: torch.Tensor | None, op: str) -> torch.Tensor:
    """The residual-add epilogue of the prepared ops: ``y + residual``, same shape and dtype only
    (``sparsec.codegen`` fuses only such adds; a broadcast here would change results silently)."""
    if residual is None:
        return y
    if residual.shape != y.shape or residual.dtype != y.dtype:
        raise ValueError(f"sparsec::{op}: residual of shape {tuple(residual.shape)} and dtype {residual.dtype} "
                         f"does not match the output ({tuple(y.shape)}, {y.dtype})")
    return y + residual


def linear_as_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear as one 2-D matmul on the transposed weight. MLIR decompositions use it:
    ``aten.linear`` decomposes to a broadcast weight + batch_matmul for some strides, and the
    sparse-encoding step of ``export_mlir`` finds one pattern (transpose(W) -> matmul)."""
    y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def version_of(t: torch.Tensor) -> int:
    """``t._version``; -1 for inference tensors, which keep no version counter (reading it
    raises). They change only inside ``torch.inference_mode``, where a weight update is not
    seen: a model built there runs on the copies made at compile time."""
    return -1 if t.is_inference() else t._version


HUGE_PAGE = 2 << 20


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in memory the OS may back with 2 MiB transparent huge pages.

    The activation-sparse kernels read scattered rows of a prepared weight; with 4 KiB pages
    nearly every row starts with a TLB miss and a page walk. Measured here (1 thread, cold,
    fp32 batch 1, medians of 41 interleaved samples, two runs each): 4096x11008 at s = 0.9
    3.55-4.65 ms -> 2.53-2.54 ms, at s = 0.5 11.6-12.8 -> 9.6-9.9 ms; 4096x4096 at s = 0.9
    1.06-1.23 -> 0.91-0.94 ms; F.linear on the (4 KiB-paged) original weight moved by noise only.

    An anonymous mapping, 2 MiB-aligned, marked ``MADV_HUGEPAGE`` (Linux with THP in ``always``
    or ``madvise`` mode; elsewhere, or below 2 MiB, or with ``SPARSEC_HUGE_PAGES=0``, a plain
    ``torch.empty``). The tensor keeps the mapping alive and frees it when it dies.
    """
    nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
    if (nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or sys.platform != "linux"
            or os.environ.get("SPARSEC_HUGE_PAGES", "1") == "0"):
        return torch.empty(shape, dtype=dtype)
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(m)
        offset = -ctypes.addressof(probe) % HUGE_PAGE
        del probe  # a live export would keep the mapping from ever closing
        m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except (OSError, ValueError) as e:  # no THP support in this kernel, or no memory for the mapping
        log.debug("sparsec: no huge-page buffer (%s); using torch.empty", e)
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(tuple(shape))
