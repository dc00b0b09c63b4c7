"""The activation family's generated Triton kernels (TEAL, CATS) for CUDA tensors: templates,
launchers and the ``triton_op`` twins of ``sparsec::sparse_linear`` / ``sparsec::sparse_cats_mlp``.
The machinery they share with other families (rendering, the on-disk cache, the fused
epilogue, AOT compilation, the graph swap) is ``sparsec.kernels._triton``.

The kernels (TEAL-style split-K GEMV, but bf16/fp16/fp32 and batch 1-16):

- ``sparse_gemv``: grid (N blocks, K blocks). A program loads its ``[16, BLOCK_K]`` slice of
  the input, applies the threshold (``!(|x| <= t)``: NaN stays), and loads the rows of
  ``W^T[BLOCK_K, BLOCK_N]`` whose channel is active for *any* batch row -- inactive rows are
  masked off, so their bytes are never fetched; a block with no active channel returns at
  once. ``tl.dot`` on a 16-row tile (batch padded to 16: tensor cores need M >= 16) and an
  fp32 ``atomic_add`` into the split-K accumulator.
- ``cats_up``: CATS first stage: for active intermediate channels j (any batch row),
  ``h = a_j * (W_up[j] . x)``, reading only active rows of ``W_up``; stage two is
  ``sparse_gemv`` on ``h`` with threshold 0 (active columns of ``W_down`` only).
- ``epilogue`` (shared): ``y = cast(acc + bias + residual)``: the fused epilogue.

Importing this module registers both ops' templates and twins with ``sparsec.kernels._triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import _triton
from .._triton import (
    MAX_BATCH, PTR, TL_DTYPE, SiteSpec, TritonOp, aot_configs, autotune_configs, available, dot, epilogue_aot,
    epilogue_source, generate, launch, run_epilogue, small_batch, triton_cdiv,
)
from .ops import sparse_cats_mlp_reference, sparse_linear_reference

__all__ = ["CatsSpec", "CONFIGS", "CATS_CONFIGS", "ACT", "OPS", "sparse_linear_cuda", "sparse_cats_mlp_cuda",
           "prepare_site", "use_triton_ops", "triton_sparse_linear", "triton_sparse_cats_mlp", "available"]

#: (BLOCK_N, BLOCK_K, num_warps, num_stages) per architecture (compute capability major).
#: sm_90/sm_80 sizes follow TEAL's split-K GEMV (BLOCK_K 64-128 rows per program, 128-256
#: columns); to be re-tuned with bench/gpu.sh on the day a GPU is lent.
CONFIGS = {
    9: [(128, 128, 4, 3), (256, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3)],
    8: [(128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)],
    "interpret": [(64, 64, 4, 1)],
}
CATS_CONFIGS = {  # (BLOCK_J, BLOCK_H, num_warps, num_stages)
    9: [(64, 128, 4, 3), (32, 256, 4, 3), (128, 64, 4, 3)],
    8: [(64, 64, 4, 2), (32, 128, 4, 2)],
    "interpret": [(32, 64, 4, 1)],
}

#: the CATS activations as Triton expressions of the gate ``g``
ACT = {
    "silu": "g * tl.sigmoid(g)",
    "relu": "tl.maximum(g, 0.0)",
    "gelu": "0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))",
    # tanh(z) = 2 sigmoid(2z) - 1: libdevice's tanh has no interpreter implementation
    "gelu_tanh": "0.5 * g * (2.0 * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)))",
}

#: the prepared ops this family generates kernels for
OPS = ("sparse_linear", "sparse_cats_mlp")


@dataclass(frozen=True)
class CatsSpec(SiteSpec):
    """A ``sparse_cats_mlp`` site: ``k`` the hidden size, ``n`` the output size, and the
    intermediate size, up-projection bias and activation (a key of ``ACT``)."""

    inter: int = 0
    up_bias: bool = False
    activation: str = ""

    def tags(self) -> list[str]:
        return ([f"i{self.inter}"] * bool(self.inter) + ["bias"] * self.has_bias + ["upbias"] * self.up_bias
                + ["res"] * self.has_residual)


_GEMV = '''

@triton.autotune(configs=[{configs}], key=["B"], reset_to_zero=["ACC"])
@triton.jit
def sparse_gemv(X, WT, ACC, B, t, stride_xb, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # ACC[b, n] += sum_k s_t(X[b, k]) * WT[k, n] over this program's K block; K={k}, N={n}
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = offs_b < B
    kmask = offs_k < {k}
    nmask = offs_n < {n}
    x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :], mask=bmask[:, None] & kmask[None, :], other=0.0)
    xf = x.to(tl.float32)
    keep = (~(tl.abs(xf) <= t)) & bmask[:, None] & kmask[None, :]
    row_active = tl.max(keep.to(tl.int32), axis=0) > 0
    if tl.max(row_active.to(tl.int32), axis=0) == 0:
        return
    xs = tl.where(keep, xf, 0.0).to(DT)
    w = tl.load(WT + offs_k[:, None] * {n} + offs_n[None, :], mask=row_active[:, None] & nmask[None, :], other=0.0)
    acc = {dot_xw}
    tl.atomic_add(ACC + offs_b[:, None] * {n} + offs_n[None, :], acc, mask=bmask[:, None] & nmask[None, :])
'''

_CATS_UP = '''

@triton.autotune(configs=[{configs}], key=["B"])
@triton.jit
def cats_up(X, G, WUP, BUP, HOUT, B, t, stride_xb, stride_gb, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
            BLOCK_H: tl.constexpr):
    # HOUT[b, j] = CATS_t(act(G[b, j])) * (WUP[j] . X[b] + bup[j]) for active j; H={k}, I={inter}
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    bmask = offs_b < B
    jmask = offs_j < {inter}
    g = tl.load(G + offs_b[:, None] * stride_gb + offs_j[None, :], mask=bmask[:, None] & jmask[None, :],
                other=0.0).to(tl.float32)
    a = ({act}).to(DT).to(tl.float32)  # the activation, rounded like the reference
    keep = (~(tl.abs(a) <= t)) & bmask[:, None] & jmask[None, :]
    row_active = tl.max(keep.to(tl.int32), axis=0) > 0
    u = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    if tl.max(row_active.to(tl.int32), axis=0) > 0:
        for h0 in range(0, {k}, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            hmask = offs_h < {k}
            x = tl.load(X + offs_b[:, None] * stride_xb + offs_h[None, :], mask=bmask[:, None] & hmask[None, :],
                        other=0.0)
            w = tl.load(WUP + offs_j[:, None] * {k} + offs_h[None, :], mask=row_active[:, None] & hmask[None, :],
                        other=0.0)
            u += {dot_up}
    if {up_bias}:
        u += tl.load(BUP + offs_j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    u = u.to(DT).to(tl.float32)
    h = tl.where(keep, a * u, 0.0).to(DT)
    tl.store(HOUT + offs_b[:, None] * {inter} + offs_j[None, :], h, mask=bmask[:, None] & jmask[None, :])
'''


# ---- rendering and AOT configurations (registered below) -----------------------------------


def _gemv_source(spec: SiteSpec, k: int, arch) -> str:
    return _GEMV.format(configs=autotune_configs(CONFIGS, ("BLOCK_N", "BLOCK_K"), arch), k=k, n=spec.n,
                        dot_xw=dot("xs", "w", spec.dtype, arch))


def _render_linear(spec: SiteSpec, arch) -> str:
    return _gemv_source(spec, spec.k, arch) + epilogue_source(spec)


def _render_cats(spec: CatsSpec, arch) -> str:
    src = _CATS_UP.format(configs=autotune_configs(CATS_CONFIGS, ("BLOCK_J", "BLOCK_H"), arch), k=spec.k,
                          inter=spec.inter, act=ACT[spec.activation], up_bias=spec.up_bias,
                          dot_up=dot("x", "tl.trans(w)", spec.dtype, arch))
    return src + _gemv_source(spec, spec.inter, arch) + epilogue_source(spec)


def _gemv_aot(spec: SiteSpec, arch):
    p = PTR[spec.dtype]
    sig = {"X": p, "WT": p, "ACC": "*fp32", "B": "i32", "t": "fp32", "stride_xb": "i32",
           "BLOCK_B": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    return sig, aot_configs(CONFIGS, ("BLOCK_N", "BLOCK_K"), arch, BLOCK_B=MAX_BATCH)


def _aot_linear(spec: SiteSpec, arch) -> dict:
    return {"sparse_gemv": _gemv_aot(spec, arch), "epilogue": epilogue_aot(spec)}


def _aot_cats(spec: CatsSpec, arch) -> dict:
    p = PTR[spec.dtype]
    sig = {"X": p, "G": p, "WUP": p, "BUP": p, "HOUT": p, "B": "i32", "t": "fp32", "stride_xb": "i32",
           "stride_gb": "i32", "BLOCK_B": "constexpr", "BLOCK_J": "constexpr", "BLOCK_H": "constexpr"}
    return {"cats_up": (sig, aot_configs(CATS_CONFIGS, ("BLOCK_J", "BLOCK_H"), arch, BLOCK_B=MAX_BATCH)),
            "sparse_gemv": _gemv_aot(spec, arch), "epilogue": epilogue_aot(spec)}


def _sparse_linear_twin_args(node: fx.Node) -> tuple[tuple, dict]:
    """The twin takes every argument, ``group_weights`` as a list (``[]`` for none)."""
    args = list(node.args) + [None] * (6 - len(node.args))
    kwargs = dict(node.kwargs)
    for i, name in ((4, "weight"), (5, "residual")):
        if name in kwargs:
            args[i] = kwargs.pop(name)
    kwargs["group_weights"] = kwargs.get("group_weights") or []
    return tuple(args[:6]), kwargs


_triton.register(TritonOp("sparse_linear", "triton_sparse_linear", _render_linear, _aot_linear,
                          _sparse_linear_twin_args))
_triton.register(TritonOp("sparse_cats_mlp", "triton_sparse_cats_mlp", _render_cats, _aot_cats))


def prepare_site(op: str, node, weight_t: torch.Tensor) -> None:
    """Called by the activation family's lowering for CUDA sites: generate the site's kernels now
    (``op``: ``"sparse_linear"`` or ``"sparse_cats_mlp"``, ``node`` the prepared op's node)."""
    if not available():
        return
    args, dtype = node.args, weight_t.dtype
    if op == "sparse_linear":
        spec = SiteSpec("sparse_linear", dtype, weight_t.shape[0], weight_t.shape[1], has_bias=args[2] is not None)
    else:
        spec = CatsSpec("sparse_cats_mlp", dtype, weight_t.shape[1], weight_t.shape[1], inter=weight_t.shape[0],
                        has_bias=args[6] is not None, up_bias=args[4] is not None, activation=args[8])
    generate(spec)


def use_triton_ops(gm: fx.GraphModule, ops=OPS) -> int:
    """Swap this family's prepared ops (or those of ``ops``) on CUDA nodes for their ``triton_op``
    twins; returns how many (``sparsec.kernels._triton.use_triton_ops``)."""
    return _triton.use_triton_ops(gm, ops)


# ---- launchers -----------------------------------------------------------------------------


def _grid_gemv(b, k, n):
    return lambda meta: (triton_cdiv(n, meta["BLOCK_N"]), triton_cdiv(k, meta["BLOCK_K"]))


def _gemv(mod, x2, wt, t):
    b, k = x2.shape
    n = wt.shape[1]
    acc = torch.zeros((b, n), dtype=torch.float32, device=x2.device)
    launch(mod.sparse_gemv)[_grid_gemv(b, k, n)](x2, wt, acc, b, float(t), x2.stride(0), BLOCK_B=MAX_BATCH)
    return acc


def sparse_linear_cuda(x, weight_t, bias, threshold, residual=None):
    """``sparsec::sparse_linear`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > MAX_BATCH or x.dtype not in TL_DTYPE or not available():
        return sparse_linear_reference(x, weight_t, bias, threshold, residual=residual)
    k, n = weight_t.shape
    spec = SiteSpec("sparse_linear", x.dtype, k, n, has_bias=bias is not None, has_residual=residual is not None)
    mod = generate(spec)
    x2 = x.reshape(-1, k).contiguous()
    acc = _gemv(mod, x2, weight_t.contiguous(), threshold)
    res = residual.reshape(-1, n).contiguous() if residual is not None else None
    y = run_epilogue(mod, acc, bias.contiguous() if bias is not None else None, res, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def sparse_cats_mlp_cuda(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold,
                         activation_name, residual=None):
    """``sparsec::sparse_cats_mlp`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)."""
    import torch.nn.functional as F

    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > MAX_BATCH or x.dtype not in TL_DTYPE or not available():
        return sparse_cats_mlp_reference(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t,
                                         down_bias, threshold, activation_name, residual)
    inter, hidden = up_weight.shape
    n = down_weight_t.shape[1]
    spec = CatsSpec("sparse_cats_mlp", x.dtype, hidden, n, inter=inter, has_bias=down_bias is not None,
                    up_bias=up_bias is not None, has_residual=residual is not None, activation=activation_name)
    mod = generate(spec)
    x2 = x.reshape(-1, hidden).contiguous()
    g = F.linear(x2, gate_weight, gate_bias).contiguous()  # the gate is dense (cuBLAS)
    h = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton_cdiv(inter, meta["BLOCK_J"]),)  # noqa: E731
    launch(mod.cats_up)[grid](x2, g, up_weight.contiguous(), up_bias if up_bias is not None else g, h, x2.shape[0],
                              float(threshold), x2.stride(0), g.stride(0), BLOCK_B=MAX_BATCH)
    acc = _gemv(mod, h, down_weight_t.contiguous(), 0.0)
    res = residual.reshape(-1, n).contiguous() if residual is not None else None
    y = run_epilogue(mod, acc, down_bias, res, x.dtype)
    return y.reshape(*x.shape[:-1], n)


# ---- the prepared ops as triton_op: kernels Inductor and torch.export can see -------------
#
# ``sparsec.codegen.lower`` swaps the prepared ops of CUDA sites for these twins (this family's
# lowerings call ``use_triton_ops``; see ``sparsec.kernels._triton.graph``). Above the GEMV's
# batch the body calls the opaque op, whose CUDA kernel picks the dense path as before.


@torch.library.triton_op("sparsec::triton_sparse_linear", mutates_args=())
def triton_sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                         weight: torch.Tensor | None, residual: torch.Tensor | None,
                         group_weights: list[torch.Tensor]) -> torch.Tensor:
    """``sparsec::sparse_linear`` with its generated Triton kernels visible to the compiler.
    (``group_weights`` is a plain list here, ``[]`` for none: ``triton_op`` infers its schema
    and takes no optional tensor list; ``use_triton_ops`` fills it in.)"""
    if not small_batch(x):
        return torch.ops.sparsec.sparse_linear.default(x, weight_t, bias, threshold, weight, residual,
                                                       group_weights or None)
    return sparse_linear_cuda(x, weight_t, bias, threshold, residual=residual)


@torch.library.triton_op("sparsec::triton_sparse_cats_mlp", mutates_args=())
def triton_sparse_cats_mlp(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None,
                           up_weight: torch.Tensor, up_bias: torch.Tensor | None, down_weight_t: torch.Tensor,
                           down_bias: torch.Tensor | None, threshold: float, activation: str,
                           residual: torch.Tensor | None = None,
                           down_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sparsec::sparse_cats_mlp`` with its generated Triton kernels visible to the compiler."""
    if not small_batch(x) or activation not in ACT:
        return torch.ops.sparsec.sparse_cats_mlp.default(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t,
                                                         down_bias, threshold, activation, residual, down_weight)
    return sparse_cats_mlp_cuda(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold,
                                activation, residual=residual)
