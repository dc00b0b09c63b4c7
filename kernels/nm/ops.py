"""N:M weight sparsity: masks, the compressed format, and the ``sparsec::nm_linear`` op.

Format: a weight ``W[out, in]`` keeps ``n`` of every ``m`` consecutive inputs of each output
row. ``values[out, in/m*n]`` holds the kept weights in group order; ``positions[out, P]``
(uint8) their index inside the group, ``bits_for(m)`` bits each (1, 2, 4 or 8: the smallest
power of two that holds ``m - 1``), little-endian inside each byte, each row padded to a
multiple of 4 bytes (the kernel reads 32 bits at a time). 2:4 fp32: 0.5 + 0.0625 of the dense
bytes (ideal speedup 1.78x); bf16: 0.5 + 0.125 (1.6x).

``sparsec::nm_linear(x, values, positions, bias, n, m, threshold, dense_copy=False,
residual=None)``: ``y = W_nm s_t(x) + b``; ``threshold < 0`` means no activation threshold
(with one, the op is the TEAL + N:M composition). CPU: C++ kernel
(``kernels/nm/csrc/nm_sparse.cpp``) for up to 16 tokens, else a dense GEMM on the weight
unpacked block by block; with ``dense_copy`` (the pass's default), the calls where a dense
GEMM wins (more than 16 tokens, bf16 from 5 tokens on an AMX CPU) use a masked dense copy of
the weight made once and cached. ``residual``: added to
the output (the epilogue ``sparsec.codegen`` fuses). CUDA: the generated Triton GEMV up to 16
tokens; above, 2:4 half-precision weights go to PyTorch's semi-structured sparse GEMM
(cuSPARSELt or CUTLASS) where ``semi_structured_route`` says it wins, else a dense GEMM on the
unpacked weight. Other devices: the reference.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .. import cpu
from .._common import version_of

__all__ = ["bits_for", "nm_mask", "pack", "unpack", "nm_linear_reference", "check_nm", "semi_structured_route"]


def bits_for(m: int) -> int:
    b = 1
    while (1 << b) < m:
        b *= 2
    return b


def check_nm(n: int, m: int, in_features: int | None = None, where: str = "") -> None:
    """Raise ``ValueError`` naming the problem for an invalid N:M pattern."""
    pre = f"{where}: " if where else ""
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2:
        raise ValueError(f"{pre}N:M needs integers n >= 1 and m >= 2, got {n}:{m}")
    if n >= m:
        raise ValueError(f"{pre}N:M needs n < m (keep n of every m), got {n}:{m}")
    if m > 256:
        raise ValueError(f"{pre}m must be at most 256, got {m}")
    if in_features is not None and in_features % m:
        raise ValueError(f"{pre}m={m} does not divide the {in_features} input features")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest scores of every ``m`` consecutive inputs per row.

    Ties go to the lower index (stable), so the mask is deterministic.
    """
    out_f, in_f = scores.shape
    check_nm(n, m, in_f)
    g = scores.reshape(out_f, in_f // m, m).float()
    # stable top-n: sort descending with the index as tie-breaker
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(out_f, in_f)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the top ``1 - sparsity`` of each output row (Wanda's per-row comparison group)."""
    out_f, in_f = scores.shape
    k = int(round(in_f * (1 - sparsity)))
    idx = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, positions)`` of ``weight`` under an exact N:M ``mask``."""
    out_f, in_f = weight.shape
    check_nm(n, m, in_f)
    groups = mask.reshape(out_f, in_f // m, m)
    counts = groups.sum(-1)
    if not bool((counts == n).all()):
        bad = int((counts != n).sum())
        raise ValueError(f"mask is not {n}:{m}: {bad} groups keep another number of weights")
    # positions of the kept entries inside each group, ascending (argsort of ~mask is stable)
    pos = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., :n]  # [out, G, n]
    vals = torch.gather(weight.reshape(out_f, in_f // m, m), -1, pos).reshape(out_f, -1)
    bits = bits_for(m)
    per_byte = 8 // bits
    flat = pos.reshape(out_f, -1).to(torch.int32)
    kept = flat.shape[1]
    nbytes = -(-kept // per_byte)
    nbytes = -(-nbytes // 4) * 4  # pad rows to 32 bits
    padded = torch.zeros(out_f, nbytes * per_byte, dtype=torch.int32)
    padded[:, :kept] = flat
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    packed = (padded.reshape(out_f, nbytes, per_byte) << shifts).sum(-1).to(torch.uint8)
    return vals.contiguous(), packed.contiguous()


def unpack(values: torch.Tensor, positions: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """The dense (zero-filled) weight back from ``pack``'s output: exact."""
    out_f, kept = values.shape
    bits = bits_for(m)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=positions.device)
    pv = (positions.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    pv = pv.reshape(out_f, -1)[:, :kept].long()
    base = torch.arange(kept, device=values.device) // n * m
    w = torch.zeros(out_f, in_features, dtype=values.dtype, device=values.device)
    return w.scatter_(1, pv + base, values)


def nm_linear_reference(x, values, positions, bias, n: int, m: int, threshold: float,
                        dense_copy: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``W_nm s_t(x) + b (+ residual)`` on the unpacked weight (``threshold < 0``: no threshold;
    ``dense_copy`` picks a CPU kernel path, the same result)."""
    from .._common import add_residual, threshold_reference

    xs = threshold_reference(x, threshold) if threshold >= 0 else x
    return add_residual(F.linear(xs, unpack(values, positions, n, m, x.shape[-1]), bias), residual, "nm_linear")


# ---- CUDA 2:4 at prefill sizes: PyTorch's semi-structured sparse GEMM ----------------------
#
# cuSPARSELt / CUTLASS 2:4 kernels use the sparse tensor cores: they pay off in compute-bound
# GEMMs (many tokens) and lose at decode sizes (pytorch issue 111339: 0.11x at M = 1), where
# the Triton GEMV over the compressed format is the kernel. These thresholds are the published
# picture, not yet measured by us: bench/gpu_check.py prints the crossover on a lent GPU
# (dense vs semi-structured at 16-4096 tokens) to replace them.
SEMI_STRUCTURED_MIN_TOKENS = 128
#: smaller weights launch-bound either way: keep the dense GEMM
SEMI_STRUCTURED_MIN_WEIGHT = 1024 * 1024


def semi_structured_route(tokens: int, out_features: int, in_features: int, n: int, m: int,
                          dtype: torch.dtype, capability: tuple[int, int] | None,
                          backends: tuple[str, ...] = ("cusparselt", "cutlass")) -> str | None:
    """Which semi-structured backend runs this N:M linear on CUDA, or ``None`` (not one).

    Only 2:4 (the tensor-core pattern), fp16/bf16, sm_80+, at least
    ``SEMI_STRUCTURED_MIN_TOKENS`` tokens and a weight of ``SEMI_STRUCTURED_MIN_WEIGHT``
    elements, with the weight's shape inside the backend's constraints (PyTorch's
    ``_DTYPE_SHAPE_CONSTRAINTS``: cuSPARSELt rows and columns multiples of 16, CUTLASS rows of
    32 and columns of 64). ``backends``: those available, best first."""
    if (n, m) != (2, 4) or dtype not in (torch.float16, torch.bfloat16):
        return None
    if capability is None or tuple(capability) < (8, 0):
        return None
    if tokens < SEMI_STRUCTURED_MIN_TOKENS or out_features * in_features < SEMI_STRUCTURED_MIN_WEIGHT:
        return None
    multiples = {"cusparselt": (16, 16), "cutlass": (32, 64)}
    for b in backends:
        r, c = multiples[b]
        if out_features % r == 0 and in_features % c == 0:
            return b
    return None


def _available_semi_structured_backends() -> tuple[str, ...]:
    cslt = getattr(torch.backends, "cusparselt", None)
    return ("cusparselt", "cutlass") if cslt is not None and cslt.is_available() else ("cutlass",)


# compressed weight -> (its version, a weight made from it): made once, remade if values or
# positions change in place, gone with the values (keyed by identity: tensors compare
# elementwise, so a plain WeakKeyDictionary cannot hold them)
_SEMI_STRUCTURED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_DENSE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the GPU's dense_copy


def _cached(cache: WeakIdKeyDictionary, values, positions, tag, make):
    key = (version_of(values), version_of(positions), positions.data_ptr(), tag)
    hit = cache.get(values)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = make()
    cache[values] = (key, w)
    return w


def _semi_structured_weight(values, positions, n, m, in_features, backend):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    def make():
        saved = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        try:
            with warnings.catch_warnings():  # "prototype stage" notice, once per weight: not the user's concern
                warnings.simplefilter("ignore", UserWarning)
                return to_sparse_semi_structured(unpack(values, positions, n, m, in_features))
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = saved

    return _cached(_SEMI_STRUCTURED, values, positions, backend, make)


def dense_weight(values, positions, n: int, m: int, in_features: int) -> torch.Tensor:
    """The unpacked (masked dense) weight, made once per compressed weight and remade if values
    or positions change in place; it goes with the values (a weak key)."""
    return _cached(_DENSE, values, positions, None, lambda: unpack(values, positions, n, m, in_features))


def nm_linear_cuda_large(x, values, positions, bias, n, m, threshold, dense_copy=False):
    """``sparsec::nm_linear`` on CUDA above the GEMV's batch: semi-structured where it wins,
    else a dense GEMM on the unpacked weight (the same kept weights either way), cached with
    ``dense_copy`` instead of unpacked per call."""
    from .._common import threshold_reference

    k = x.shape[-1]
    tokens = x.numel() // max(k, 1)
    route = semi_structured_route(tokens, values.shape[0], k, n, m, x.dtype,
                                  torch.cuda.get_device_capability(x.device) if x.is_cuda else None,
                                  _available_semi_structured_backends())
    xs = threshold_reference(x, threshold) if threshold >= 0 else x
    if route is None:
        w = dense_weight(values, positions, n, m, k) if dense_copy else unpack(values, positions, n, m, k)
        return F.linear(xs, w, bias)
    w = _semi_structured_weight(values, positions, n, m, k, route)
    y = F.linear(xs.reshape(-1, k), w, bias)
    return y.reshape(*x.shape[:-1], values.shape[0])


_lib = torch.library.Library("sparsec", "FRAGMENT")
_lib.define(
    "nm_linear(Tensor x, Tensor values, Tensor positions, Tensor? bias, int n, int m, float threshold, "
    "bool dense_copy=False, Tensor? residual=None) -> Tensor"
)


@torch.library.impl(_lib, "nm_linear", "CompositeExplicitAutograd")
def nm_linear(x, values, positions, bias, n, m, threshold, dense_copy=False, residual=None):
    """``dense_copy``: where the library GEMM on the masked dense weight beats the N:M kernels
    on this CPU (more than 16 tokens; bf16 from 5 tokens on AMX CPUs), keep that dense weight,
    made on the first such call and cached beside the compressed one (kernels/nm/csrc/nm_sparse.cpp);
    without it those calls unpack the weight blockwise every time (no extra memory, slower)."""
    if x.device.type == "cpu":
        ext = cpu.extension()  # registers the C++ CPU kernel for later calls
        if ext is not None:
            return ext.nm_linear_op(x, values, positions, bias, n, m, threshold, dense_copy, residual)
    return nm_linear_reference(x, values, positions, bias, n, m, threshold, dense_copy, residual)


@torch.library.register_fake("sparsec::nm_linear", lib=_lib)
def _(x, values, positions, bias, n, m, threshold, dense_copy=False, residual=None):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.impl(_lib, "nm_linear", "CUDA")
def _(x, values, positions, bias, n, m, threshold, dense_copy=False, residual=None):
    from .triton import nm_linear_cuda

    return nm_linear_cuda(x, values, positions, bias, n, m, threshold, residual=residual, dense_copy=dense_copy)
