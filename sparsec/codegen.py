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
compiled callable checks the weights' version counters on every call and re-copies a weight
that was changed in place (an optimizer step, ``load_state_dict``), so results are never
stale.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.kernels.cpu import empty_huge, version_of

from .passbase import GraphContext

__all__ = ["Prepared", "lower", "fuse_residual_adds", "RefreshingCallable"]

# op -> (prepared twin, index of the weight that is prepared transposed)
_LOWERINGS = {
    "threshold_linear": ("sparse_linear", 1),
    "cats_mlp": ("sparse_cats_mlp", 5),
}


@dataclass
class Prepared:
    """One prepared buffer: the transposed weights of one or more linears, side by side.

    ``sources``: ``(fqn, weight, first column, last column, version)`` per weight.
    """

    fqn: str
    buffer: torch.Tensor
    sources: list

    @property
    def param(self) -> torch.Tensor:
        return self.sources[0][1]

    def stale(self) -> bool:
        return any(version_of(w) != v for _, w, _, _, v in self.sources)

    def refresh_if_stale(self) -> bool:
        changed = False
        for i, (fqn, w, c0, c1, v) in enumerate(self.sources):
            if version_of(w) != v:
                with torch.no_grad():
                    self.buffer[:, c0:c1].copy_(w.detach().t())
                self.sources[i] = (fqn, w, c0, c1, version_of(w))
                changed = True
        return changed


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
                sources.append((f, w, c, c + w.shape[0], version_of(w)))
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
        for (node, fqn, w), (_, _, c0, c1, _) in zip(members, prep.sources):
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


class RefreshingCallable:
    """The compiled graph, re-copying prepared weights whose source changed in place."""

    def __init__(self, fn, prepared: list[Prepared]):
        self.fn = fn
        self.prepared = prepared
        # one flat list compare per call: a decode step calls this once per token, and a
        # per-weight Python check over SmolLM2's 120 prepared weights cost ~0.1 ms of a 66 ms token
        self._weights = [w for p in prepared for _, w, _, _, _ in p.sources if not w.is_inference()]
        self._versions = [w._version for w in self._weights]

    def __call__(self, *args):
        versions = [w._version for w in self._weights]
        if versions != self._versions:
            for p in self.prepared:
                p.refresh_if_stale()
            self._versions = versions
        return self.fn(*args)
