"""What a generated kernel module is specialised for (:class:`SiteSpec`), what a family
registers for each op it generates kernels for (:class:`TritonOp`), and the probes of the
environment both depend on (Triton installed, interpreter or GPU, which architecture)."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MAX_BATCH", "SiteSpec", "TritonOp", "register", "registered", "registered_ops", "available",
           "current_arch"]

#: rows (tokens) up to which the generated GEMVs run: tl.dot needs a 16-row tile on tensor
#: cores, so the batch is padded to 16 and larger batches take the ops' other paths
MAX_BATCH = 16


def available() -> bool:
    """Whether Triton imports here."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuda_arch():
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        return 9 if major >= 9 else 8
    return 9


def current_arch():
    """What kernels are rendered for here: ``"interpret"`` or the compute capability major (8, 9)."""
    return "interpret" if _interpret() else _cuda_arch()


@dataclass(frozen=True)
class SiteSpec:
    """What a generated kernel module is specialised for: the op, dtype, weight shape and which
    epilogues are fused. A family whose kernels depend on more subclasses it (a frozen
    dataclass too: specs are cache keys) and adds its parts to :meth:`tags`."""

    op: str  # the prepared op, in the sparsec namespace: picks the registered TritonOp
    dtype: torch.dtype
    k: int  # input features
    n: int  # output features
    has_bias: bool = False
    has_residual: bool = False

    def tags(self) -> list[str]:
        """The parts of :attr:`name` after the sizes."""
        return ["bias"] * self.has_bias + ["res"] * self.has_residual

    @property
    def name(self) -> str:
        dt = str(self.dtype).split(".")[-1]
        mode = "interp" if _interpret() else "cuda"
        return "_".join([self.op, dt, f"k{self.k}", f"n{self.n}", *self.tags()]) + f"_{mode}"


@dataclass(frozen=True)
class TritonOp:
    """How one prepared op gets generated kernels; a family registers one per op (:func:`register`).

    - ``render(spec, arch)``: the module's kernels, the source after the shared header;
    - ``aot(spec, arch)``: ``{kernel: (signature, [(constexprs, num_warps, num_stages), ...])}``,
      every kernel of the module in every autotune configuration, for :func:`aot_compile`;
    - ``twin``: the name of its ``triton_op`` twin in the sparsec namespace, which
      ``use_triton_ops`` puts in its place on CUDA nodes, with ``twin_args(node) -> (args,
      kwargs)`` where the twin's schema differs from the op's.
    """

    op: str
    twin: str
    render: Callable
    aot: Callable
    twin_args: Callable | None = None


_OPS: dict[str, TritonOp] = {}


def register(entry: TritonOp) -> TritonOp:
    """Add (or replace: a reloaded module) the Triton templates of ``entry.op``."""
    _OPS[entry.op] = entry
    return entry


def registered(op: str) -> TritonOp:
    try:
        return _OPS[op]
    except KeyError:
        raise KeyError(f"no Triton templates are registered for sparsec::{op}; its family's "
                       f"kernels/<family>/triton.py registers them when imported "
                       f"(registered: {sorted(_OPS)})") from None


def registered_ops() -> dict[str, TritonOp]:
    """Op name -> :class:`TritonOp`, for every family imported so far (a copy)."""
    return dict(_OPS)
