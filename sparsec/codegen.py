"""Codegen: lower the passes' ops to kernels that read prepared weights.

The passes emit ops on the model's own weights. Each op a plugin wants lowered has a
``Lowering`` registered through ``sparsec_register_lowerings``: ``lower`` calls its
``prepare`` with the op's nodes and a ``LoweringContext`` whose derived-weight cache makes,
once per compile, the weight copies its kernels read (``transposed``: ``W^T``, one contiguous
row per input channel, in huge-page memory on CPU). Then ``fuse_residual_adds`` folds each
residual add that consumes an op with an ``epilogue`` into it, and, where a GPU is present,
each lowering's ``triton`` swaps the ops of CUDA sites for ``torch.library.triton_op`` twins
that Inductor inlines; CPU sites never do (tracing a Triton body needs a GPU driver). Core
names no method: the built-in families register their lowerings like third-party plugins.

Prepared weights are copies (about 0.8x the model's linear weights, more memory). The
compiled callable (``RefreshingCallable``) checks, on every call, that it got the weight
tensors it was compiled with, unchanged (same object, version counter and data pointer).
A weight changed in place (an optimizer step, ``load_state_dict``, ``w.data = ...``) or
another model's weight (torch.compile shares compiled code between instances of a class,
whose weights are graph inputs) is re-copied into the prepared buffers; a weight that a pass
pinned (``GraphContext.pin_weight``: the plan holds its replacement) must be bit-identical to
the compiled one or the call raises a ``PlanError``. So a compiled graph runs the weights it
is called with, or refuses.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from sparsec.kernels._common import empty_huge, version_of

from .errors import PlanError, SparsecNotice
from .passbase import GraphContext

__all__ = ["Lowering", "LoweringContext", "Prepared", "Pinned", "lower", "op_name", "fuse_residual_adds",
           "RefreshingCallable", "weight_digest"]



@dataclass
class Prepared:
    """One prepared buffer: the transposed weights of one or more linears, side by side.

    ``sources``: ``[fqn, weight, first column, last column, version, data pointer]`` per weight.
    """

    fqn: str
    buffer: torch.Tensor
    sources: list

    @property
    def param(self) -> torch.Tensor:
        return self.sources[0][1]

    def stale(self) -> bool:
        return any(version_of(w) != v or w.data_ptr() != ptr for _, w, _, _, v, ptr in self.sources)

    def refresh(self, weights: dict[str, torch.Tensor] | None = None) -> bool:
        """Re-copy every source that changed: another tensor given for its FQN in ``weights``,
        or the same tensor with another version or data pointer (``w.data = ...``)."""
        changed = False
        for i, (fqn, w, c0, c1, v, ptr) in enumerate(self.sources):
            new = (weights or {}).get(fqn, w)
            if new is not w or version_of(new) != v or new.data_ptr() != ptr:
                with torch.no_grad():
                    self.buffer[:, c0:c1].copy_(new.detach().t())
                self.sources[i] = [fqn, new, c0, c1, version_of(new), new.data_ptr()]
                changed = True
        return changed

    refresh_if_stale = refresh


def weight_digest(w: torch.Tensor) -> str:
    """A digest of a weight's bytes (dtype and shape included): equal only for equal weights."""
    t = w.detach()
    t = (t.cpu() if t.device.type != "cpu" else t).contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class Pinned:
    """A weight the compiled graph does not read because the plan holds its replacement
    (``GraphContext.pin_weight``): it must stay bit-identical to the one compiled."""

    fqn: str
    weight: torch.Tensor
    digest: str
    replaced_by: str


@dataclass(frozen=True)
class Lowering:
    """How core lowers one op that a plugin's passes emit (``sparsec_register_lowerings``).

    - ``prepare(lctx, nodes)``: rewrite every node of the op (in graph order) into what runs,
      typically its prepared twin on derived weight copies from ``lctx.transposed``; ``None``:
      the op runs as emitted.
    - ``epilogue``: the name of the op's residual argument, if it adds one in place: core then
      folds ``residual + op(...)`` into it (exact adds only, see ``fuse_residual_adds``).
    - ``triton(gm)``: on a machine with a GPU, swap the op's CUDA nodes for ``triton_op`` twins
      that Inductor inlines; returns how many.
    """

    prepare: Callable | None = None
    epilogue: str | None = None
    triton: Callable | None = None


class LoweringContext:
    """What a ``Lowering.prepare`` gets: the graph context and the derived-weight cache.

    Derived weights (the transposed copies kernels stream row by row) are made once per
    compile, registered as buffers of the graph module, and kept current by the compiled
    callable (``RefreshingCallable``) from the weights the graph is called with."""

    def __init__(self, ctx: GraphContext):
        self.ctx = ctx
        self.made: dict[tuple, tuple[str, Prepared]] = {}

    def real_weight(self, node) -> tuple[str | None, torch.Tensor | None]:
        """``(FQN, tensor)`` of a node that is a 2-D model parameter with a real value."""
        fqn = self.ctx.params.get(node) if isinstance(node, fx.Node) else None
        t = self.ctx.tensors.get(fqn) if fqn is not None else None
        return (fqn, t) if t is not None and t.dim() == 2 else (None, None)

    def transposed(self, fqns_weights: list, before: fx.Node) -> tuple[fx.Node, Prepared]:
        """A ``get_attr`` node (inserted before ``before``) for the weights transposed and side
        by side, ``[in, sum(out)]``: each input channel one contiguous row. One copy per set."""
        key = tuple(f for f, _ in fqns_weights)
        gm = self.ctx.gm
        if key not in self.made:
            attr = f"_sparsec_wt_{len(self.made)}"
            parts = [w.detach().t() for _, w in fqns_weights]
            shape = (parts[0].shape[0], sum(p.shape[1] for p in parts))
            if parts[0].device.type == "cpu":  # scattered row reads: huge pages spare TLB misses
                buf = torch.cat(parts, dim=1, out=empty_huge(shape, parts[0].dtype))
            else:
                buf = torch.cat(parts, dim=1)
            sources, c = [], 0
            for f, w in fqns_weights:
                sources.append([f, w, c, c + w.shape[0], version_of(w), w.data_ptr()])
                c += w.shape[0]
            gm.register_buffer(attr, buf)
            self.made[key] = (attr, Prepared("+".join(key), buf, sources))
        attr, prep = self.made[key]
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(attr)
        node.meta["val"] = prep.buffer
        return node, prep

    @property
    def prepared(self) -> list[Prepared]:
        return [p for _, p in self.made.values()]


def op_name(target) -> str | None:
    """``"ns::name"`` of a ``torch.library`` op (its overload packet's schema name)."""
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def lower(ctx: GraphContext, registry=None) -> list[Prepared]:
    """Lower the passes' ops in ``ctx.gm`` through the registered ``Lowering`` of each op (in
    registration order, built-ins first); return the derived weights made.

    Then residual adds are folded into the ops that declare an ``epilogue``, and, where a GPU
    is present, CUDA sites are swapped for their ``triton_op`` twins. Needs real weights
    (``ctx.tensors``): the dynamo entry point has them.
    """
    from .plugins import get_registry

    reg = registry or get_registry()
    lctx = LoweringContext(ctx)
    graph = ctx.gm.graph
    for name, low in reg.lowerings.items():
        if low.prepare is None:
            continue
        nodes = [n for n in graph.nodes if n.op == "call_function" and op_name(n.target) == name]
        if nodes:
            low.prepare(lctx, nodes)
    fuse_residual_adds(ctx.gm, {name: low.epilogue for name, low in reg.lowerings.items() if low.epilogue})
    if torch.cuda.is_available():
        for low in reg.lowerings.values():
            if low.triton is not None:
                low.triton(ctx.gm)  # CUDA sites: kernels Inductor sees (triton_op)
    graph.lint()
    ctx.gm.recompile()
    return lctx.prepared


def fuse_residual_adds(gm: fx.GraphModule, epilogues: dict[str, str] | None = None) -> int:
    """``aten.add(residual, op(...))`` -> ``op(..., residual=residual)`` for each op named in
    ``epilogues`` (op -> its residual argument; default: every registered ``Lowering``'s
    ``epilogue``); returns how many.

    Only where the op's output has no other user and the add neither broadcasts nor promotes
    (residual, op output and sum of one shape and dtype, provably for symbolic shapes) and
    has no ``alpha``: then the fused op computes exactly what the two did."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    def same(a, b) -> bool:
        return (a is not None and b is not None and a.dtype == b.dtype and a.dim() == b.dim()
                and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape)))

    if epilogues is None:
        from .plugins import get_registry

        epilogues = {name: low.epilogue for name, low in get_registry().lowerings.items() if low.epilogue}
    graph, fused = gm.graph, 0
    for add in list(graph.nodes):
        if add.op != "call_function" or add.target is not torch.ops.aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        for out, res in (add.args, add.args[::-1]):
            if not (isinstance(out, fx.Node) and isinstance(res, fx.Node)) or out is res or out.op != "call_function":
                continue
            arg = epilogues.get(op_name(out.target) or "")
            if arg is None or len(out.users) != 1:
                continue
            n_pos = [a.name for a in out.target._schema.arguments].index(arg)
            if out.kwargs.get(arg) is not None or (len(out.args) > n_pos and out.args[n_pos] is not None):
                continue
            vo, vr, va = (n.meta.get("val") for n in (out, res, add))
            if not (same(vo, vr) and same(vo, va)):
                continue
            with graph.inserting_before(add):  # every input of `out` and `res` is defined by now
                new = graph.call_function(out.target, tuple(out.args), {**out.kwargs, arg: res})
            new.meta.update(add.meta)
            add.replace_all_uses_with(new)
            graph.erase_node(add)
            graph.erase_node(out)
            fused += 1
            break
    return fused


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


class RefreshingCallable:
    """The compiled graph, run only on the weights it is called with.

    ``positions``: FQN -> index of that weight among the compiled graph's inputs. Per call,
    the watched weights (prepared sources and pinned weights) are compared with the ones last
    seen: the same object, version counter and data pointer. Any difference re-copies the
    prepared buffers it feeds and checks pinned weights by their bytes (a ``PlanError`` if
    they differ: the plan's replacement was made from another weight). Changes that none of
    the three shows (``w.data.mul_(...)``: ``.data`` has a version counter of its own) are
    not seen; the README's Guarantees say so.
    """

    def __init__(self, fn, prepared: list[Prepared], pinned: list[Pinned] = (), positions: dict[str, int] | None = None):
        self.fn = fn
        self.prepared = prepared
        self.pinned = {p.fqn: p for p in pinned}
        watched: dict[str, torch.Tensor] = {}
        for p in prepared:
            for fqn, w, *_ in p.sources:
                watched.setdefault(fqn, w)
        for p in pinned:
            watched.setdefault(p.fqn, p.weight)
        positions = positions or {}
        self._fqns = list(watched)
        self._bound = [watched[f] for f in self._fqns]
        pos = [positions.get(f) for f in self._fqns]
        # every weight is a graph input on the dynamo path; one that is not (no position) is
        # checked for in-place changes only
        self._pick = (operator.itemgetter(*pos) if len(pos) > 1 else (lambda a, i=pos[0]: (a[i],))) \
            if pos and None not in pos else (lambda a: [b if i is None else a[i] for i, b in zip(pos, self._bound)])
        self._switched = False
        self._bind(self._bound)

    def _bind(self, weights) -> None:
        self._bound = list(weights)
        # inference tensors have no version counter (reading it raises): version_of gives -1
        self._ver = version_of if any(w.is_inference() for w in self._bound) else _VERSION
        self._versions = list(map(self._ver, self._bound))
        self._ptrs = list(map(_DATA_PTR, self._bound))

    def __call__(self, *args):
        # C-level maps over the watched weights, once per call: SmolLM2 watches 210 weights,
        # ~120 us per call measured here (identity 13, versions 45, data pointers 60) of a
        # 50-70 ms decode token; a Python loop calling version_of took 310 us
        cur = self._pick(args)
        if (any(map(operator.is_not, cur, self._bound)) or list(map(self._ver, cur)) != self._versions
                or list(map(_DATA_PTR, cur)) != self._ptrs):
            self._rebind(list(cur))
        return self.fn(*args)

    def _rebind(self, cur: list[torch.Tensor]) -> None:
        changed = {}
        other = False
        for fqn, new, old, v, ptr in zip(self._fqns, cur, self._bound, self._versions, self._ptrs):
            if new is not old or version_of(new) != v or new.data_ptr() != ptr:
                changed[fqn] = new
                other |= new is not old
        for fqn, new in changed.items():
            pin = self.pinned.get(fqn)
            if pin is not None and weight_digest(new) != pin.digest:  # equal bytes: a copy of the same weight
                raise PlanError(
                    f"the compiled graph runs {pin.replaced_by} in place of the weight {fqn!r}, and it was "
                    f"called with {'another model' if new is not pin.weight else 'that weight changed'}: "
                    "the plan's replacement was made from the weight it was calibrated on. Calibrate the "
                    "changed model (sparsec.calibrate) and compile it with its own plan.")
        for p in self.prepared:
            p.refresh(changed)
        if other and not self._switched:
            self._switched = True
            mib = sum(p.buffer.numel() * p.buffer.element_size() for p in self.prepared) / 2**20
            warnings.warn(
                "sparsec: torch.compile reused a compiled graph for another model of this class (weights are graph "
                f"inputs): it now runs this model's weights, re-copying {mib:.0f} MiB of prepared weights each time "
                "the model changes. To avoid the copies, compile each model after torch._dynamo.reset().",
                SparsecNotice, stacklevel=3)
        self._bind(cur)
