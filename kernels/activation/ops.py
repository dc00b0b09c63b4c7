"""Activation-sparsity ops: thresholded linear (TEAL) and the CATS gated MLP.

Each op is a ``torch.library.custom_op`` so that Inductor and ``torch.export`` treat it as
one opaque node, with a plain-torch ``*_reference`` beside it that gives exactly the
masked-dense result the kernels are tested against.

Two families:

- ``sparsec::threshold_linear`` / ``sparsec::cats_mlp`` take the model's weights as they are.
  The passes emit them; ``sparsec.export`` keeps them (the program's signature stays the
  model's own). On CPU they run the C++ kernel on a transposed copy of the weight made on
  first use and refreshed when the weight changes (its version counter).
- ``sparsec::sparse_linear`` / ``sparsec::sparse_cats_mlp`` take *prepared* weights: the
  transposed weight (``[in, out]``, one contiguous row per input channel) made once at
  compile time by ``sparsec.codegen``. CPU tensors run the C++ kernels (``kernels/cpu.py``),
  CUDA tensors the generated Triton kernels (``kernels/activation/triton.py``).

Kernels are used for at most ``MAX_KERNEL_ROWS`` rows (tokens); beyond that the union of the
rows' active channels is nearly everything and a dense GEMM on the thresholded input wins
(prefill), so the ops call it instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu
from .._common import add_residual, empty_huge, threshold_reference, version_of

#: tokens per call up to which the sparse kernels run (the issue's decode range, batch 1-16)
MAX_KERNEL_ROWS = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)

__all__ = [
    "MAX_KERNEL_ROWS",
    "threshold_reference",
    "sparse_linear_reference",
    "sparse_cats_mlp_reference",
    "threshold_linear_reference",
    "cats_mlp_reference",
    "ACTIVATIONS",
]

#: Gate activations CATS recognises, by the name the op takes.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda a: F.gelu(a),
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "relu": F.relu,
}


def threshold_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """TEAL: ``y = W s_t(x) + b``."""
    return F.linear(threshold_reference(x, threshold), weight, bias)


def cats_mlp_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    threshold: float,
    activation: str,
) -> torch.Tensor:
    """CATS: ``W_down (CATS_t(act(W_gate x)) * (W_up x))``."""
    a = ACTIVATIONS[activation](F.linear(x, gate_weight, gate_bias))
    h = threshold_reference(a, threshold) * F.linear(x, up_weight, up_bias)
    return F.linear(h, down_weight, down_bias)


def sparse_linear_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    weight: torch.Tensor | None = None, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``threshold_linear`` with the prepared weight ``weight_t = W^T`` (``weight``: the same
    weight untransposed, for dense paths), plus ``residual`` when given."""
    return add_residual(F.linear(threshold_reference(x, threshold), weight_t.t(), bias), residual, "sparse_linear")


def sparse_cats_mlp_reference(
    x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation, residual=None
) -> torch.Tensor:
    """``cats_mlp`` with the prepared down weight ``down_weight_t = W_down^T``, plus ``residual``."""
    y = cats_mlp_reference(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t.t(), down_bias, threshold, activation
    )
    return add_residual(y, residual, "sparse_cats_mlp")


# ---- CPU dispatch -----------------------------------------------------------------------------
# The prepared ops' CPU kernels are C++ (kernels/activation/csrc/activation_sparse.cpp), registered with
# the dispatcher when the extension loads; these Python paths serve the first call (which
# loads it), the unprepared ops, and machines where it could not be built.


def _sparse_linear_cpu(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=None):
    ext = cpu.extension()
    if ext is None:
        return sparse_linear_reference(x, weight_t, bias, threshold, weight, residual)
    return ext.sparse_linear_op(x, weight_t, bias, threshold, weight, residual, group_weights)


def _cats_cpu(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation,
              residual=None, down_weight=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsec::sparse_cats_mlp: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    ext = cpu.extension()
    if ext is None:
        return sparse_cats_mlp_reference(
            x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation, residual
        )
    return ext.sparse_cats_mlp_op(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold,
                                  activation, residual, down_weight)


def _cpu_kernel_ok(x: torch.Tensor, *ws: torch.Tensor | None) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        x.device.type == "cpu"
        and x.dtype in _KERNEL_DTYPES
        and 0 < rows <= MAX_KERNEL_ROWS
        and all(w is None or (w.dtype == x.dtype and w.device.type == "cpu") for w in ws)
    )


#: weight -> (version, data_ptr, W^T): the transposed copies the unprepared ops use on CPU
_TRANSPOSED = torch.utils.weak.WeakIdKeyDictionary()


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()``, made once per weight and remade when the weight changes."""
    hit = _TRANSPOSED.get(w)
    if hit is not None and hit[0] == version_of(w) and hit[1] == w.data_ptr():
        return hit[2]
    wt = w.detach().t()
    wt = empty_huge(wt.shape, wt.dtype).copy_(wt) if wt.device.type == "cpu" else wt.contiguous()
    _TRANSPOSED[w] = (version_of(w), w.data_ptr(), wt)
    return wt


# ---- the ops --------------------------------------------------------------------------------
# mutates_args=() and a fresh output: the ops are pure, so Inductor may reorder or CSE them.


@torch.library.custom_op("sparsec::threshold_linear", mutates_args=())
def threshold_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    if _cpu_kernel_ok(x, weight, bias):
        return _sparse_linear_cpu(x, transposed(weight), bias, threshold, weight)
    return threshold_linear_reference(x, weight, bias, threshold)


@threshold_linear.register_fake
def _(x, weight, bias, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sparsec::cats_mlp", mutates_args=())
def cats_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    threshold: float,
    activation: str,
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsec::cats_mlp: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if _cpu_kernel_ok(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
        return _cats_cpu(
            x, gate_weight, gate_bias, up_weight, up_bias, transposed(down_weight), down_bias, threshold, activation
        )
    return cats_mlp_reference(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold, activation
    )


@cats_mlp.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold, activation):
    return x.new_empty((*x.shape[:-1], down_weight.shape[0]))


# The prepared ops are defined with torch.library.Library rather than custom_op: custom_op
# adds a Python autograd layer in front of every call (measured: 40-60 us per call), and the
# C++ CPU kernel registered for them must be reached without Python.
_lib = torch.library.Library("sparsec", "FRAGMENT")
# ``weight``: optionally the original [out, in] weight, which the dense paths (prefill, a
# batch whose active inputs cover nearly everything) use for MKL's faster layout
# ``residual``: the fused residual-add epilogue (``sparsec.codegen.fuse_residual_adds``)
# ``group_weights``: the original weights of the linears a group fused into one call (same use)
_lib.define("sparse_linear(Tensor x, Tensor weight_t, Tensor? bias, float threshold, Tensor? weight=None, "
            "Tensor? residual=None, Tensor[]? group_weights=None) -> Tensor")
_lib.define(
    "sparse_cats_mlp(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor up_weight, Tensor? up_bias, "
    "Tensor down_weight_t, Tensor? down_bias, float threshold, str activation, Tensor? residual=None, "
    "Tensor? down_weight=None) -> Tensor"
)


@torch.library.impl(_lib, "sparse_linear", "CompositeExplicitAutograd")
def sparse_linear(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=None):
    """``W s_t(x) + b (+ residual)`` with the prepared weight ``weight_t = W^T`` (``[in, out]``)."""
    if x.device.type == "cpu":  # loads (and registers) the C++ kernel
        return _sparse_linear_cpu(x, weight_t, bias, threshold, weight, residual, group_weights)
    return sparse_linear_reference(x, weight_t, bias, threshold, weight, residual)


@torch.library.register_fake("sparsec::sparse_linear", lib=_lib)
def _(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=None):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@torch.library.impl(_lib, "sparse_cats_mlp", "CompositeExplicitAutograd")
def sparse_cats_mlp(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation,
                    residual=None, down_weight=None):
    """CATS with the prepared down weight ``down_weight_t = W_down^T`` (``[inter, hidden]``);
    ``down_weight``: optionally the original ``[hidden, inter]`` one, for the dense paths."""
    if x.device.type == "cpu":
        return _cats_cpu(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation,
                         residual, down_weight)
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsec::sparse_cats_mlp: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    return sparse_cats_mlp_reference(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation, residual
    )


@torch.library.register_fake("sparsec::sparse_cats_mlp", lib=_lib)
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation, residual=None,
      down_weight=None):
    return x.new_empty((*x.shape[:-1], down_weight_t.shape[1]))


# ---- CUDA: generated Triton kernels -------------------------------------------------------------
# register_kernel("cuda") rather than triton_op: on a machine without a GPU driver Inductor
# must never trace a Triton body (shared/ALGORITHMS.md, "verified here").


@torch.library.impl(_lib, "sparse_linear", "CUDA")
def _(x, weight_t, bias, threshold, weight=None, residual=None, group_weights=None):
    from .triton import sparse_linear_cuda

    return sparse_linear_cuda(x, weight_t, bias, threshold, residual=residual)


@torch.library.impl(_lib, "sparse_cats_mlp", "CUDA")
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation, residual=None,
      down_weight=None):
    from .triton import sparse_cats_mlp_cuda

    return sparse_cats_mlp_cuda(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight_t, down_bias, threshold, activation,
        residual=residual,
    )


@threshold_linear.register_kernel("cuda")
def _(x, weight, bias, threshold):
    from .triton import sparse_linear_cuda

    return sparse_linear_cuda(x, transposed(weight), bias, threshold)


@cats_mlp.register_kernel("cuda")
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, threshold, activation):
    from .triton import sparse_cats_mlp_cuda

    return sparse_cats_mlp_cuda(
        x, gate_weight, gate_bias, up_weight, up_bias, transposed(down_weight), down_bias, threshold, activation
    )
