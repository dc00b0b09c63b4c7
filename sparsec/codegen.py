"""Codegen: lower the passes' ops to kernels that read prepared weights.

The passes emit ops on the model's own weights (``sparsec::threshold_linear``,
``sparsec::cats_mlp``). Here, once per compile, each weight the kernels read row-wise is
copied transposed (``W^T``: one contiguous row per input channel) into a buffer of the
compiled graph module, and the op is swapped for its prepared twin
(``sparsec::sparse_linear``, ``sparsec::sparse_cats_mlp``). Those dispatch on device: C++ on
CPU tensors, generated Triton on CUDA tensors (``sparsec.kernels.triton_gen``), with the
plain-torch reference as the fallback. Then ``fuse_residual_adds`` folds each residual add
that consumes one of those ops into the op's epilogue (``residual=``). Where a GPU is
present, the ops of CUDA sites become their ``torch.library.triton_op`` twins
(``triton_gen.use_triton_ops``), so Inductor inlines the generated Triton kernels into its own
code; CPU sites never do (tracing a Triton body needs a GPU driver).

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
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.kernels.cpu import empty_huge, version_of

from .errors import PlanError, SparsecNotice
from .passbase import GraphContext

__all__ = ["Prepared", "Pinned", "lower", "fuse_residual_adds", "RefreshingCallable", "weight_digest"]

# op -> (prepared twin, index of the weight that is prepared transposed)
_LOWERINGS = {
    "threshold_linear": ("sparse_linear", 1),
    "cats_mlp": ("sparse_cats_mlp", 5),
}


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


def _lowerable(op) -> tuple | None:
    if getattr(op, "namespace", None) != "sparsec":
        return None
    return _LOWERINGS.get(op._schema.name.split("::")[-1]) if hasattr(op, "_schema") else None


def lower(ctx: GraphContext) -> list[Prepared]:
    """Swap the passes' ops for their prepared twins in ``ctx.gm``; return the prepared weights.

    TEAL linears that read the same input with the same threshold and no bias (q/k/v, gate/up)
    are fused horizontally: one kernel call over their transposed weights side by side (each
    active input channel is then one longer contiguous row), its output sliced per linear.
    On SmolLM2 that is 4 calls per block instead of 7; small GEMVs are dominated by per-call
    costs. Needs real weights (``ctx.tensors``): the dynamo entry point has them. An op whose
    weight is not a known parameter is left as it is (it runs through the unprepared op).
    """
    gm, graph = ctx.gm, ctx.gm.graph
    made: dict[tuple, tuple[str, Prepared]] = {}

    def real_of(node):
        fqn = ctx.params.get(node) if isinstance(node, fx.Node) else None
        t = ctx.tensors.get(fqn) if fqn is not None else None
        return (fqn, t) if t is not None and t.dim() == 2 else (None, None)

    def prepared(fqns_weights) -> tuple[str, Prepared]:
        key = tuple(f for f, _ in fqns_weights)
        if key not in made:
            attr = f"_sparsec_wt_{len(made)}"
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
            made[key] = (attr, Prepared("+".join(key), buf, sources))
        return made[key]

    def get_attr(attr, before):
        with graph.inserting_before(before):
            g = graph.get_attr(attr)
        g.meta["val"] = getattr(gm, attr)
        return g

    groups: dict[tuple, list] = defaultdict(list)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        low = _lowerable(node.target)
        if low is None:
            continue
        twin, idx = low
        fqn, real = real_of(node.args[idx])
        if real is None:
            continue
        if twin == "sparse_linear" and node.args[2] is None:
            groups[(node.args[0], float(node.args[3]))].append((node, fqn, real))
            continue
        attr, prep = prepared([(fqn, real)])
        args = list(node.args)
        args[idx] = get_attr(attr, node)
        kwargs = dict(node.kwargs)
        if twin == "sparse_linear":
            args.append(node.args[1])  # the original weight, for the dense paths (prefill)
        else:
            kwargs["down_weight"] = node.args[5]  # likewise the original down weight
        with graph.inserting_before(node):
            new = graph.call_function(getattr(torch.ops.sparsec, twin).default, tuple(args), kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if real.is_cuda:
            from sparsec.kernels import triton_gen

            triton_gen.prepare_site(twin, new, prep.buffer)

    for (x, t), members in groups.items():
        first = members[0][0]  # members were collected in graph order
        attr, prep = prepared([(f, w) for _, f, w in members])
        with graph.inserting_before(first):
            g = graph.get_attr(attr)
            g.meta["val"] = prep.buffer
            # the original weights too, for the dense paths (prefill): a lone linear's, or each
            # member's (one GEMM per member: faster than one on the concatenated W^T)
            if len(members) == 1:
                fused = graph.call_function(torch.ops.sparsec.sparse_linear.default,
                                            (x, g, None, t, members[0][0].args[1]))
            else:
                fused = graph.call_function(torch.ops.sparsec.sparse_linear.default, (x, g, None, t),
                                            {"group_weights": [node.args[1] for node, _, _ in members]})
        fused.meta.update(first.meta)
        for (node, fqn, w), (_, _, c0, c1, _, _) in zip(members, prep.sources):
            if len(members) == 1:
                out = fused
            else:
                with graph.inserting_before(first):
                    out = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, c0, c1))
                out.meta.update(node.meta)
            node.replace_all_uses_with(out)
        for node, _, _ in members:  # only now: `first` anchors the insertions above
            graph.erase_node(node)
        if prep.buffer.is_cuda:
            from sparsec.kernels import triton_gen

            triton_gen.prepare_site("sparse_linear", fused, prep.buffer)
    fuse_residual_adds(gm)
    if torch.cuda.is_available():
        from sparsec.kernels import triton_gen

        if triton_gen.available():
            triton_gen.use_triton_ops(gm)  # CUDA sites: kernels Inductor sees (triton_op)
    graph.lint()
    gm.recompile()
    return [p for _, p in made.values()]


#: kernels with a residual-add epilogue (``residual=``): the Triton templates add it in the
#: store (one launch fewer per linear: o_proj and down_proj of every block), the C++ kernels
#: in place on their fresh output
_EPILOGUE_OPS = {"sparsec::sparse_linear", "sparsec::sparse_cats_mlp", "sparsec::nm_linear"}


def fuse_residual_adds(gm: fx.GraphModule) -> int:
    """``aten.add(residual, op(...))`` -> ``op(..., residual=residual)``; returns how many.

    Only where the op's output has no other user and the add neither broadcasts nor promotes
    (residual, op output and sum of one shape and dtype, provably for symbolic shapes) and
    has no ``alpha``: then the fused op computes exactly what the two did."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    def same(a, b) -> bool:
        return (a is not None and b is not None and a.dtype == b.dtype and a.dim() == b.dim()
                and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape)))

    graph, fused = gm.graph, 0
    for add in list(graph.nodes):
        if add.op != "call_function" or add.target is not torch.ops.aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        for out, res in (add.args, add.args[::-1]):
            if not (isinstance(out, fx.Node) and isinstance(res, fx.Node)) or out is res or out.op != "call_function":
                continue
            schema = getattr(out.target, "_schema", None)
            if schema is None or schema.name not in _EPILOGUE_OPS or len(out.users) != 1:
                continue
            n_pos = [a.name for a in schema.arguments].index("residual")
            if out.kwargs.get("residual") is not None or (len(out.args) > n_pos and out.args[n_pos] is not None):
                continue
            vo, vr, va = (n.meta.get("val") for n in (out, res, add))
            if not (same(vo, vr) and same(vo, va)):
                continue
            with graph.inserting_before(add):  # every input of `out` and `res` is defined by now
                new = graph.call_function(out.target, tuple(out.args), {**out.kwargs, "residual": res})
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
