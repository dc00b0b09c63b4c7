"""The R-Sparse family's generated Triton kernels for CUDA tensors: templates, the launcher
``rsparse_linear_cuda`` and the ``triton_op`` twin of ``sparsec::rsparse_linear_t``. The
machinery it shares with other families (rendering, the on-disk cache, AOT compilation, the
graph swap) is ``sparsec.kernels._triton``.

    y = (x m) W^T + ((x (1 - m)) v) us + b (+ residual),    m_i = !(|x_i| s_i <= t)

Two launches per call (batch 1-16, plus one ``torch.zeros`` for the fp32 accumulator):

- ``rsparse_gemv``: grid (column blocks of ``W^T`` then of ``v``, K blocks), split-K as in the
  activation family's ``sparse_gemv``. A program loads its ``[16, BLOCK_K]`` slice of the
  input and of ``scale`` and computes the mask once. A program of the first ``cdiv(N,
  BLOCK_N)`` columns is the sparse term: it loads the rows of ``W^T[BLOCK_K, BLOCK_N]``
  whose channel is active for *any* batch row (the others are masked off: their bytes are
  never fetched) and ``atomic_add``s ``(x m) W^T`` into ``ACC[:, :N]``. A program of the
  ``cdiv(r, BLOCK_N)`` columns after those is the low-rank input: the rows of ``v[BLOCK_K,
  BLOCK_N]`` of channels *inactive* for any batch row, ``z = (x (1 - m)) v`` into
  ``ACC[:, N:]``. One launch reads each weight row it needs once, and the input once per
  program; a block with nothing to read does nothing.
- ``rsparse_out``: grid (column blocks of ``us``). ``y = cast(ACC[:, :N] + z us + bias +
  residual)``: all ``r`` rows of ``us`` for its columns (dense: every rank is used), then the
  epilogue fused into the same store (the shared ``epilogue`` would be a third launch;
  decode GEMVs are dominated by per-launch costs). ``r = 0`` makes it the plain epilogue.

``z`` stays fp32 (the reference keeps it fp32). On the GPU, bf16 sites multiply it with
``us`` on the tensor cores as ``bf16(z) + bf16(z - bf16(z))`` (two bf16 dots: ``z`` to about
2^-17, far below the output's rounding); fp16 sites (``z`` may overflow fp16's range) and
fp32 sites use IEEE fp32 products.

Importing this module registers the op's templates and twin with ``sparsec.kernels._triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import _triton
from .._triton import (
    MAX_BATCH, PTR, TL_DTYPE, SiteSpec, TritonOp, aot_configs, autotune_configs, available, dot, generate, launch,
    small_batch, triton_cdiv,
)
from .ops import MAX_KERNEL_ROWS, _check, _dense_path, rsparse_linear_t_reference

__all__ = ["RSparseSpec", "CONFIGS", "OUT_CONFIGS", "OPS", "rsparse_linear_cuda", "prepare_site", "use_triton_ops",
           "triton_rsparse_linear_t", "available"]

#: ``rsparse_gemv``: (BLOCK_N, BLOCK_K, num_warps, num_stages) per architecture (compute
#: capability major); the activation family's split-K GEMV sizes (TEAL's), since the sparse
#: term is that GEMV: to be re-tuned with bench/gpu.sh on the day a GPU is lent.
CONFIGS = {
    9: [(128, 128, 4, 3), (256, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3)],
    8: [(128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)],
    "interpret": [(64, 64, 4, 1)],
}
#: ``rsparse_out``: (BLOCK_N, BLOCK_R, num_warps, num_stages). Narrow column blocks: one
#: program per column block reads all r rows of ``us``, so N / BLOCK_N programs must still
#: fill the GPU (4096 / 64 = 64 programs).
OUT_CONFIGS = {
    9: [(64, 64, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (32, 64, 2, 3)],
    8: [(64, 64, 4, 2), (32, 128, 4, 2), (32, 64, 2, 2)],
    "interpret": [(32, 32, 4, 1)],
}

#: the prepared ops this family generates kernels for
OPS = ("rsparse_linear_t",)


@dataclass(frozen=True)
class RSparseSpec(SiteSpec):
    """An ``rsparse_linear_t`` site: ``k`` input and ``n`` output features and the rank ``r``
    of the low-rank term (``v``: ``[k, r]``, ``us``: ``[r, n]``; 0: none)."""

    rank: int = 0

    def tags(self) -> list[str]:
        return [f"r{self.rank}"] + super().tags()


_GEMV = '''

@triton.autotune(configs=[{configs}], key=["B"], reset_to_zero=["ACC"])
@triton.jit
def rsparse_gemv(X, SCALE, WT, V, ACC, B, t, stride_xb, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # column blocks [0, cdiv(N, BLOCK_N)):  ACC[b, n]     += sum_k x[b, k] m[b, k] WT[k, n]
    # the cdiv(R, BLOCK_N) blocks after:    ACC[b, N + j] += sum_k x[b, k] (1 - m[b, k]) V[k, j]
    # over this program's K block; m = !(|x| scale <= t); K={k}, N={n}, R={r}, ACC row {ld}
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    nb = ({n} + BLOCK_N - 1) // BLOCK_N
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    bmask = offs_b < B
    kmask = offs_k < {k}
    valid = bmask[:, None] & kmask[None, :]
    xf = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=valid, other=0.0).to(tl.float32)
    s = tl.load(SCALE + offs_k, mask=kmask, other=0.0)
    # one fp32 product, negated <=: a NaN input (or product) stays active, as in the reference
    active = ~(tl.abs(xf) * s[None, :] <= t)
    if pid_n < nb:
        keep = active & valid
        row = tl.max(keep.to(tl.int32), axis=0) > 0  # channel active for any batch row
        if tl.max(row.to(tl.int32), axis=0) > 0:
            xs = tl.where(keep, xf, 0.0).to(DT)  # x is DT: exact
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < {n}
            w = tl.load(WT + offs_k[:, None] * {n} + offs_n[None, :], mask=row[:, None] & nmask[None, :], other=0.0)
            acc = {dot_xw}
            tl.atomic_add(ACC + offs_b[:, None] * {ld} + offs_n[None, :], acc, mask=bmask[:, None] & nmask[None, :])
    else:
        keep = (~active) & valid
        row = tl.max(keep.to(tl.int32), axis=0) > 0  # channel inactive for any batch row
        if tl.max(row.to(tl.int32), axis=0) > 0:
            xc = tl.where(keep, xf, 0.0).to(DT)
            offs_j = (pid_n - nb) * BLOCK_N + tl.arange(0, BLOCK_N)
            jmask = offs_j < {r}
            v = tl.load(V + offs_k[:, None] * {r} + offs_j[None, :], mask=row[:, None] & jmask[None, :], other=0.0)
            z = {dot_xv}
            tl.atomic_add(ACC + offs_b[:, None] * {ld} + {n} + offs_j[None, :], z,
                          mask=bmask[:, None] & jmask[None, :])
'''

_OUT = '''

@triton.autotune(configs=[{configs}], key=["B"])
@triton.jit
def rsparse_out(ACC, US, BIAS, RES, Y, B, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # Y[b, n] = cast(ACC[b, n] + sum_j ACC[b, N + j] US[j, n] + bias[n] + RES[b, n]);
    # N={n}, R={r}, ACC row {ld}, bias={has_bias}, residual={has_residual}
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = offs_b < B
    nmask = offs_n < {n}
    ymask = bmask[:, None] & nmask[None, :]
    acc = tl.load(ACC + offs_b[:, None] * {ld} + offs_n[None, :], mask=ymask, other=0.0)
    for r0 in range(0, {r}, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < {r}
        z = tl.load(ACC + offs_b[:, None] * {ld} + {n} + offs_r[None, :], mask=bmask[:, None] & rmask[None, :],
                    other=0.0)
        u = tl.load(US + offs_r[:, None] * {n} + offs_n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc += {dot_zu}
    if {has_bias}:
        acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if {has_residual}:
        acc += tl.load(RES + offs_b[:, None] * {n} + offs_n[None, :], mask=ymask, other=0.0).to(tl.float32)
    tl.store(Y + offs_b[:, None] * {n} + offs_n[None, :], acc.to(DT), mask=ymask)
'''


# ---- rendering and AOT configurations (registered below) -----------------------------------


def _dot_zu(dtype: torch.dtype, arch) -> str:
    """``z @ u`` for the fp32 ``z`` and a ``us`` tile of the site's dtype (see the module doc)."""
    if dtype == torch.bfloat16:
        hi = "z.to(tl.bfloat16)"
        lo = "(z - z.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)"
        return f"{dot(hi, 'u', dtype, arch)} + {dot(lo, 'u', dtype, arch)}"
    return dot("z", "u", torch.float32, arch)


def _render(spec: RSparseSpec, arch) -> str:
    ld = spec.n + spec.rank
    src = _GEMV.format(configs=autotune_configs(CONFIGS, ("BLOCK_N", "BLOCK_K"), arch), k=spec.k, n=spec.n,
                       r=spec.rank, ld=ld, dot_xw=dot("xs", "w", spec.dtype, arch),
                       dot_xv=dot("xc", "v", spec.dtype, arch))
    return src + _OUT.format(configs=autotune_configs(OUT_CONFIGS, ("BLOCK_N", "BLOCK_R"), arch), n=spec.n,
                             r=spec.rank, ld=ld, has_bias=spec.has_bias, has_residual=spec.has_residual,
                             dot_zu=_dot_zu(spec.dtype, arch))


def _aot(spec: RSparseSpec, arch) -> dict:
    p = PTR[spec.dtype]
    gemv = {"X": p, "SCALE": "*fp32", "WT": p, "V": p, "ACC": "*fp32", "B": "i32", "t": "fp32", "stride_xb": "i32",
            "BLOCK_B": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    out = {"ACC": "*fp32", "US": p, "BIAS": p, "RES": p, "Y": p, "B": "i32",
           "BLOCK_B": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"}
    return {"rsparse_gemv": (gemv, aot_configs(CONFIGS, ("BLOCK_N", "BLOCK_K"), arch, BLOCK_B=MAX_BATCH)),
            "rsparse_out": (out, aot_configs(OUT_CONFIGS, ("BLOCK_N", "BLOCK_R"), arch, BLOCK_B=MAX_BATCH))}


_triton.register(TritonOp("rsparse_linear_t", "triton_rsparse_linear_t", _render, _aot))


def prepare_site(node: fx.Node, weight_t: torch.Tensor, rank: int) -> None:
    """For a lowering of CUDA sites: generate the kernels of the prepared op's ``node``
    (``rsparse_linear_t(x, W^T, b, ...)``) now rather than on its first call."""
    if not available():
        return
    k, n = weight_t.shape
    generate(RSparseSpec("rsparse_linear_t", weight_t.dtype, k, n, has_bias=node.args[2] is not None, rank=rank))


def use_triton_ops(gm: fx.GraphModule, ops=OPS) -> int:
    """Swap this family's prepared op on CUDA nodes for its ``triton_op`` twin; returns how many
    (``sparsec.kernels._triton.use_triton_ops``)."""
    return _triton.use_triton_ops(gm, ops)


# ---- the launcher --------------------------------------------------------------------------


def rsparse_linear_cuda(x, weight_t, bias, scale, v, us, threshold, weight=None, residual=None):
    """``sparsec::rsparse_linear_t`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    Decode sizes (1 to 16 tokens) run the generated kernels; above ``MAX_KERNEL_ROWS`` tokens
    the op's dense path (one GEMM on the masked input, two thin ones for the low-rank term),
    as on CPU; anything the templates do not take (mixed dtypes, fp64, empty) the reference."""
    _check(x, weight_t, bias, scale, v, us)
    k, n = weight_t.shape
    r = v.shape[1]
    rows = x.numel() // max(k, 1)
    same = all(w is None or w.dtype == x.dtype for w in (weight_t, bias, v, us, weight))
    if rows > MAX_KERNEL_ROWS and same:
        return _dense_path(x, weight, weight_t, bias, scale, v, us, threshold, residual)
    out_shape = (*x.shape[:-1], n)
    if (rows == 0 or rows > MAX_BATCH or n == 0 or not same or x.dtype not in TL_DTYPE or not available()
            or (residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype))):
        return rsparse_linear_t_reference(x, weight_t, bias, scale, v, us, threshold, weight, residual)
    spec = RSparseSpec("rsparse_linear_t", x.dtype, k, n, has_bias=bias is not None,
                       has_residual=residual is not None, rank=r)
    mod = generate(spec)
    x2 = x.reshape(-1, k).contiguous()
    b = x2.shape[0]
    # one buffer for both fp32 sums, [b, N + r]: ACC[:, :N] the sparse term, ACC[:, N:] z --
    # one memset, and the autotuner's reset_to_zero covers both
    acc = torch.zeros((b, n + r), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton_cdiv(n, meta["BLOCK_N"]) + triton_cdiv(r, meta["BLOCK_N"]),  # noqa: E731
                         triton_cdiv(k, meta["BLOCK_K"]))
    launch(mod.rsparse_gemv)[grid](x2, scale.to(torch.float32).contiguous(), weight_t.contiguous(), v.contiguous(),
                                   acc, b, float(threshold), x2.stride(0), BLOCK_B=MAX_BATCH)
    y = torch.empty((b, n), dtype=x.dtype, device=x.device)
    # the kernel reads BIAS / RES only when the site has them; x2 (the site's dtype, never
    # written) stands in for an absent one so that the signature stays the AOT one
    res = residual.reshape(b, n).contiguous() if residual is not None else x2
    grid_out = lambda meta: (triton_cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    launch(mod.rsparse_out)[grid_out](acc, us.contiguous(), bias.contiguous() if bias is not None else x2, res, y, b,
                                      BLOCK_B=MAX_BATCH)
    return y.reshape(out_shape)


# ---- the prepared op as triton_op: kernels Inductor and torch.export can see ---------------
#
# ``sparsec.codegen.lower`` swaps ``rsparse_linear_t`` on CUDA sites for this twin (the
# family's lowering calls ``use_triton_ops``; see ``sparsec.kernels._triton.graph``). Above the
# kernels' batch the body calls the opaque op, whose CUDA kernel takes the dense path.


@torch.library.triton_op("sparsec::triton_rsparse_linear_t", mutates_args=())
def triton_rsparse_linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                            v: torch.Tensor, us: torch.Tensor, threshold: float, weight: torch.Tensor | None = None,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``sparsec::rsparse_linear_t`` with its generated Triton kernels visible to the compiler."""
    if not small_batch(x):
        return torch.ops.sparsec.rsparse_linear_t.default(x, weight_t, bias, scale, v, us, threshold, weight, residual)
    return rsparse_linear_cuda(x, weight_t, bias, scale, v, us, threshold, weight=weight, residual=residual)
