"""ATen decompositions of the R-Sparse ops, for ``sparsec.export_mlir``: the mask as
elementwise ops, the sparse term one matmul on the transposed weight (``linear_as_mm``, the
form the export's sparse-encoding step finds), the low-rank term two matmuls."""

from __future__ import annotations

import torch

from .._common import add_residual, linear_as_mm
from .ops import rsparse_mask


def _rsparse(x, weight, bias, scale, v, us, threshold):
    m = rsparse_mask(x, scale, threshold)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs, xc = torch.where(m, x, zero), torch.where(m, zero, x)
    return linear_as_mm(xs, weight, bias) + torch.mm(torch.mm(xc.reshape(-1, x.shape[-1]), v), us).reshape(
        *x.shape[:-1], us.shape[1])


def rsparse_linear(x, weight, bias, scale, v, us, threshold):
    return _rsparse(x, weight, bias, scale, v, us, threshold)


def rsparse_linear_t(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    return add_residual(_rsparse(x, weight_t.t(), bias, scale, v, us, threshold), residual, "rsparse_linear_t")


#: op name (in the sparsec namespace) -> decomposition
DECOMPOSITIONS = {"rsparse_linear": rsparse_linear, "rsparse_linear_t": rsparse_linear_t}
