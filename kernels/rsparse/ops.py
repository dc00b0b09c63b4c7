"""R-Sparse ops: sparse input channels plus a low-rank remainder (ICLR 2025, ALGORITHMS.md).

    y = W (x * m) + US_r (V_r^T (x * (1 - m))) + b,    m_i = 1[|x_i| s_i > t],  s_i = ||W[:, i]||_2

``v`` is ``V_r`` (``[in, r]``: one contiguous row of ``r`` coefficients per input channel)
and ``us`` is ``(U_r S_r)^T`` (``[r, out]``: one contiguous row per rank), both from an SVD
of ``W`` made at calibration (the plan's tensors). Written this way, every term is the same
primitive, "add coefficient x row" over a set of rows: the rows of ``W^T`` of the active
channels, the rows of ``v`` of the inactive ones, then all ``r`` rows of ``us``. A token reads
``k out + (in - k) r + r out`` weights instead of ``in out``.

Two ops, as in the activation family:

- ``sparsec::rsparse_linear`` reads the model's own weight (what the pass emits and
  ``sparsec.export`` keeps);
- ``sparsec::rsparse_linear_t`` reads a prepared ``W^T`` made once at compile time
  (``sparsec.codegen``), defined with ``torch.library.Library`` so that its C++ CPU kernel is
  reached without a Python layer in front. CUDA tensors run the generated Triton kernels
  (``kernels/rsparse/triton.py``).

Beyond ``MAX_KERNEL_ROWS`` tokens (prefill) the kernels are not used: a dense GEMM on the
masked input plus the low-rank GEMMs wins.

The mask is computed in fp32 (fp64 for fp64 inputs) as ``!(|x| s <= t)``: a NaN input stays
active and propagates, as in every sparsec threshold. Accumulation is fp32 for fp32, bf16 and
fp16 inputs; the reference does the same, so a kernel is compared with it exactly up to
summation order.
"""

from __future__ import annotations

import torch

from .. import cpu
from .._common import add_residual, scaled_active, version_of

__all__ = ["MAX_KERNEL_ROWS", "rsparse_linear_reference", "rsparse_linear_t_reference", "rsparse_mask", "transposed"]

#: tokens per call up to which the sparse kernels run (decode, batch 1-16)
MAX_KERNEL_ROWS = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def rsparse_mask(x: torch.Tensor, scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """``m = !(|x| s <= t)``, a bool tensor of x's shape (NaN inputs active)."""
    return scaled_active(x, scale, threshold)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rsparse_linear_t_reference(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    """The op with the prepared ``weight_t = W^T`` (``[in, out]``), plus ``residual``."""
    cd = _compute_dtype(x)
    m = rsparse_mask(x, scale, threshold)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs, xc = torch.where(m, x, zero).to(cd), torch.where(m, zero, x).to(cd)
    y = xs @ weight_t.to(cd)
    if us.shape[0]:  # rank 0: no low-rank term (an empty matmul would still be exact, but say it)
        y = y + (xc @ v.to(cd)) @ us.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return add_residual(y.to(x.dtype), residual, "rsparse_linear_t")


def rsparse_linear_reference(x, weight, bias, scale, v, us, threshold):
    """``W (x m) + US_r V_r^T (x (1 - m)) + b``, accumulated in fp32 (fp64 for fp64)."""
    return rsparse_linear_t_reference(x, weight.t(), bias, scale, v, us, threshold)


def _dense_path(x, weight, weight_t, bias, scale, v, us, threshold, residual):
    """Prefill: the masked input through one GEMM on the original ``[out, in]`` weight (MKL's
    faster layout) and the low-rank term through two thin GEMMs, in x's dtype."""
    m = rsparse_mask(x, scale, threshold)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs, xc = torch.where(m, x, zero), torch.where(m, zero, x)
    y = torch.nn.functional.linear(xs, weight, bias) if weight is not None else xs @ weight_t + (0 if bias is None else bias)
    if us.shape[0]:
        y = y + (xc @ v) @ us
    return add_residual(y, residual, "rsparse_linear_t")


def _check(x, weight_t, bias, scale, v, us):
    """Shapes the kernels index by: a clear error instead of a read out of bounds."""
    k, n = weight_t.shape
    problems = []
    if x.shape[-1] != k:
        problems.append(f"x has {x.shape[-1]} features, the weight {k} inputs")
    if tuple(scale.shape) != (k,):
        problems.append(f"scale has shape {tuple(scale.shape)}, not ({k},)")
    if v.dim() != 2 or v.shape[0] != k:
        problems.append(f"v has shape {tuple(v.shape)}, not ({k}, rank)")
    elif tuple(us.shape) != (v.shape[1], n):
        problems.append(f"us has shape {tuple(us.shape)}, not ({v.shape[1]}, {n})")
    if bias is not None and tuple(bias.shape) != (n,):
        problems.append(f"bias has shape {tuple(bias.shape)}, not ({n},)")
    if problems:
        raise ValueError("sparsec::rsparse_linear: " + "; ".join(problems))


def _kernel_ok(x: torch.Tensor, *ws: torch.Tensor | None) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and 0 < rows <= MAX_KERNEL_ROWS
            and all(w is None or (w.dtype == x.dtype and w.device.type == "cpu") for w in ws))


def _rsparse_cpu(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    _check(x, weight_t, bias, scale, v, us)
    if not _kernel_ok(x, weight_t, bias, v, us):
        if x.numel() // max(x.shape[-1], 1) > MAX_KERNEL_ROWS and x.dtype == weight_t.dtype == v.dtype:
            return _dense_path(x, weight, weight_t, bias, scale, v, us, threshold, residual)
        return rsparse_linear_t_reference(x, weight_t, bias, scale, v, us, threshold, weight, residual)
    ext = cpu.extension()
    if ext is None or not hasattr(ext, "rsparse_linear_op"):
        return rsparse_linear_t_reference(x, weight_t, bias, scale, v, us, threshold, weight, residual)
    return ext.rsparse_linear_op(x, weight_t, bias, scale.float().contiguous(), v.contiguous(), us.contiguous(),
                                 threshold, weight, residual)


#: weight -> (version, data_ptr, W^T): the transposed copies the unprepared op uses on CPU
_TRANSPOSED = torch.utils.weak.WeakIdKeyDictionary()


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()``, made once per weight and remade when the weight changes."""
    hit = _TRANSPOSED.get(w)
    if hit is not None and hit[0] == version_of(w) and hit[1] == w.data_ptr():
        return hit[2]
    wt = w.detach().t().contiguous()
    _TRANSPOSED[w] = (version_of(w), w.data_ptr(), wt)
    return wt


# ---- the ops --------------------------------------------------------------------------------
# mutates_args=() and a fresh output: pure, so Inductor may reorder or CSE them.


@torch.library.custom_op("sparsec::rsparse_linear", mutates_args=())
def rsparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                   v: torch.Tensor, us: torch.Tensor, threshold: float) -> torch.Tensor:
    if x.device.type == "cpu" and _kernel_ok(x, weight, bias, v, us):
        return _rsparse_cpu(x, transposed(weight), bias, scale, v, us, threshold, weight)
    _check(x, weight.t(), bias, scale, v, us)
    return rsparse_linear_reference(x, weight, bias, scale, v, us, threshold)


@rsparse_linear.register_fake
def _(x, weight, bias, scale, v, us, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_lib = torch.library.Library("sparsec", "FRAGMENT")
# ``weight``: optionally the original [out, in] weight, for the dense path (prefill)
# ``residual``: the fused residual-add epilogue (``sparsec.codegen.fuse_residual_adds``)
_lib.define("rsparse_linear_t(Tensor x, Tensor weight_t, Tensor? bias, Tensor scale, Tensor v, Tensor us, "
            "float threshold, Tensor? weight=None, Tensor? residual=None) -> Tensor")


@torch.library.impl(_lib, "rsparse_linear_t", "CompositeExplicitAutograd")
def rsparse_linear_t(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    """R-Sparse with the prepared ``weight_t = W^T`` (``[in, out]``)."""
    if x.device.type == "cpu":  # loads (and registers) the C++ kernel
        return _rsparse_cpu(x, weight_t, bias, scale, v, us, threshold, weight, residual)
    _check(x, weight_t, bias, scale, v, us)
    return rsparse_linear_t_reference(x, weight_t, bias, scale, v, us, threshold, weight, residual)


@torch.library.register_fake("sparsec::rsparse_linear_t", lib=_lib)
def _(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


# ---- CUDA: generated Triton kernels (kernels/rsparse/triton.py) ------------------------------
# register_kernel("cuda") rather than triton_op: on a machine without a GPU driver Inductor
# must never trace a Triton body (shared/ALGORITHMS.md, "verified here"). Imported lazily:
# Triton is needed only once a CUDA tensor arrives. Above MAX_KERNEL_ROWS tokens the launcher
# takes ``_dense_path``, as the CPU kernel does.


@torch.library.impl(_lib, "rsparse_linear_t", "CUDA")
def _(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    from .triton import rsparse_linear_cuda

    return rsparse_linear_cuda(x, weight_t, bias, scale, v, us, threshold, weight=weight, residual=residual)


@rsparse_linear.register_kernel("cuda")
def _(x, weight, bias, scale, v, us, threshold):
    from .triton import rsparse_linear_cuda

    return rsparse_linear_cuda(x, transposed(weight), bias, scale, v, us, threshold, weight=weight)
