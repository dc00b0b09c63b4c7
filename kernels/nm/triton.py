"""The N:M family's generated Triton kernel for CUDA tensors: the ``nm_gemv`` template, its
launcher and the ``triton_op`` twin of ``sparsec::nm_linear``. The machinery it shares with
other families (rendering, the on-disk cache, the fused epilogue, AOT compilation, the graph
swap) is ``sparsec.kernels._triton``.

- ``nm_gemv``: grid (output blocks, kept-value blocks). A program loads its ``[BLOCK_O,
  BLOCK_V]`` slice of the compressed weight (values and packed positions, the format of
  ``sparsec.kernels.nm``), gathers the inputs those positions select (thresholded first when
  the op has a threshold) and ``atomic_add``s the row sums into an fp32 accumulator, one batch
  row at a time; the shared ``epilogue`` adds bias and residual and casts.

Importing this module registers the op's template and twin with ``sparsec.kernels._triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import _triton
from .._common import add_residual
from .._triton import (
    MAX_BATCH, PTR, TL_DTYPE, SiteSpec, TritonOp, aot_configs, autotune_configs, available, epilogue_aot,
    epilogue_source, generate, launch, run_epilogue, small_batch, triton_cdiv,
)
from .ops import bits_for, nm_linear_cuda_large, nm_linear_reference

__all__ = ["NMSpec", "NM_CONFIGS", "OPS", "nm_linear_cuda", "use_triton_ops", "triton_nm_linear", "available"]

NM_CONFIGS = {  # (BLOCK_O, BLOCK_V, num_warps, num_stages)
    9: [(64, 256, 4, 3), (128, 128, 4, 3), (32, 512, 4, 3)],
    8: [(64, 128, 4, 2), (32, 256, 4, 2)],
    "interpret": [(32, 64, 4, 1)],
}

#: the prepared ops this family generates kernels for
OPS = ("nm_linear",)


@dataclass(frozen=True)
class NMSpec(SiteSpec):
    """An ``nm_linear`` site: ``k`` input and ``n`` output features, keeping ``nm[0]`` of every
    ``nm[1]`` inputs; ``thresholded``: the op has an activation threshold (TEAL + N:M)."""

    nm: tuple[int, int] = (0, 0)
    thresholded: bool = False

    def tags(self) -> list[str]:
        return [f"{self.nm[0]}of{self.nm[1]}"] * bool(self.nm[1]) + super().tags()


_NM = '''

@triton.autotune(configs=[{configs}], key=["B"], reset_to_zero=["ACC"])
@triton.jit
def nm_gemv(X, VALS, POS, ACC, B, t, stride_xb, BLOCK_O: tl.constexpr, BLOCK_V: tl.constexpr):
    # ACC[b, o] += sum_v VALS[o, v] * s_t(X)[b, (v // {n}) * {m} + pos(o, v)] over this program's
    # values; {n}:{m}, {bits} bits per position, K={k}, O={out}, {kept} values and {pbytes} bytes per row
    pid_o = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    omask = offs_o < {out}
    vmask = offs_v < {kept}
    m2 = omask[:, None] & vmask[None, :]
    w = tl.load(VALS + offs_o[:, None] * {kept} + offs_v[None, :], mask=m2, other=0.0).to(tl.float32)
    byte = tl.load(POS + offs_o[:, None] * {pbytes} + (offs_v[None, :] * {bits}) // 8, mask=m2, other=0).to(tl.int32)
    pos = (byte >> ((offs_v[None, :] * {bits}) % 8)) & {pmask}
    k = (offs_v[None, :] // {n}) * {m} + pos
    for b in range(0, B):
        x = tl.load(X + b * stride_xb + k, mask=m2, other=0.0).to(tl.float32)
        if {thresholded}:
            x = tl.where((~(tl.abs(x) <= t)) & m2, x, 0.0)
        tl.atomic_add(ACC + b * {out} + offs_o, tl.sum(w * x, axis=1), mask=omask)
'''


def _render(spec: NMSpec, arch) -> str:
    n, m = spec.nm
    bits = bits_for(m)
    kept = spec.k // m * n
    pbytes = -(-(-(-kept * bits // 8)) // 4) * 4
    src = _NM.format(configs=autotune_configs(NM_CONFIGS, ("BLOCK_O", "BLOCK_V"), arch), n=n, m=m, bits=bits,
                     pmask=(1 << bits) - 1, k=spec.k, out=spec.n, kept=kept, pbytes=pbytes,
                     thresholded=spec.thresholded)
    return src + epilogue_source(spec)


def _aot(spec: NMSpec, arch) -> dict:
    p = PTR[spec.dtype]
    sig = {"X": p, "VALS": p, "POS": "*u8", "ACC": "*fp32", "B": "i32", "t": "fp32", "stride_xb": "i32",
           "BLOCK_O": "constexpr", "BLOCK_V": "constexpr"}
    return {"nm_gemv": (sig, aot_configs(NM_CONFIGS, ("BLOCK_O", "BLOCK_V"), arch)), "epilogue": epilogue_aot(spec)}


_triton.register(TritonOp("nm_linear", "triton_nm_linear", _render, _aot))


def use_triton_ops(gm: fx.GraphModule, ops=OPS) -> int:
    """Swap this family's prepared op on CUDA nodes for its ``triton_op`` twin; returns how many
    (``sparsec.kernels._triton.use_triton_ops``)."""
    return _triton.use_triton_ops(gm, ops)


def nm_linear_cuda(x, values, positions, bias, n, m, threshold, residual=None, dense_copy=False):
    """``sparsec::nm_linear`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

    Decode sizes (<= 16 tokens) run the generated GEMV; larger batches on CUDA go to
    ``nm.nm_linear_cuda_large`` (semi-structured 2:4 where it wins, else dense)."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if rows > MAX_BATCH and x.is_cuda:
        return add_residual(nm_linear_cuda_large(x, values, positions, bias, n, m, threshold, dense_copy), residual,
                            "nm_linear")
    if rows == 0 or rows > MAX_BATCH or x.dtype not in TL_DTYPE or not available():
        return nm_linear_reference(x, values, positions, bias, n, m, threshold, residual=residual)
    out_f, kept = values.shape
    spec = NMSpec("nm_linear", x.dtype, k, out_f, has_bias=bias is not None, has_residual=residual is not None,
                  nm=(n, m), thresholded=threshold >= 0)
    mod = generate(spec)
    x2 = x.reshape(-1, k).contiguous()
    acc = torch.zeros((x2.shape[0], out_f), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton_cdiv(out_f, meta["BLOCK_O"]), triton_cdiv(kept, meta["BLOCK_V"]))  # noqa: E731
    launch(mod.nm_gemv)[grid](x2, values.contiguous(), positions.contiguous(), acc, x2.shape[0], float(threshold),
                              x2.stride(0))
    res = residual.reshape(-1, out_f).contiguous() if residual is not None else None
    y = run_epilogue(mod, acc, bias.contiguous() if bias is not None else None, res, x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


# ---- the prepared op as triton_op: kernels Inductor and torch.export can see ---------------
#
# ``sparsec.codegen.lower`` swaps ``nm_linear`` on CUDA sites for this twin (the family's
# lowering calls ``use_triton_ops``; see ``sparsec.kernels._triton.graph``). Above the GEMV's
# batch the body calls the opaque op, whose CUDA kernel picks the dense or semi-structured
# path as before.


@torch.library.triton_op("sparsec::triton_nm_linear", mutates_args=())
def triton_nm_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                     n: int, m: int, threshold: float, dense_copy: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """``sparsec::nm_linear`` with its generated Triton GEMV visible to the compiler."""
    if not small_batch(x):
        return torch.ops.sparsec.nm_linear.default(x, values, positions, bias, n, m, threshold, dense_copy, residual)
    return nm_linear_cuda(x, values, positions, bias, n, m, threshold, residual=residual)
