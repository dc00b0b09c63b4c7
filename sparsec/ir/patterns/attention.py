"""Attention, in the two forms models trace to, and the KV-cache write that feeds it.

- ``aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=,
  enable_gqa=)``: transformers' ``sdpa`` attention, torch's ``nn.MultiheadAttention`` fast path.
- ``matmul(q, k^T) [* scale | / d] [+ mask] -> softmax(-1) [-> to / dropout(p=0)] -> matmul(p, v)``:
  the ``eager`` attention of transformers and of hand-written models.

Either may read keys and values repeated for grouped-query attention (transformers'
``repeat_kv``: ``unsqueeze(2) -> expand -> reshape``, or ``repeat_interleave`` on dim 1) or,
for SDPA, pass ``enable_gqa=True``. Keys and values may come from a cache:

- static (``StaticCache``): ``index_copy_(cache, 2, cache_position, new)`` on a cache tensor
  that is a graph input (a static-address buffer of the cache object), and attention reads
  the whole cache;
- dynamic (``DynamicCache``): ``cat([past, new], -2)``.

``match_attention`` returns every match and every rejected candidate with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...passbase import GraphContext
from .common import NoMatch, bind_args, is_call, val

__all__ = ["AttentionMatch", "CacheMatch", "match_attention"]

aten = torch.ops.aten

_SDPA = (aten.scaled_dot_product_attention.default,)
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_MATMUL = (aten.matmul.default, aten.bmm.default)
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)
_CACHE_WRITES = (aten.index_copy_.default, aten.index_copy.default)


@dataclass
class CacheMatch:
    """The cache write that produces the keys (or values) attention reads."""

    kind: str  # "static": written in place at positions, attention reads the whole cache; "dynamic": cat
    key_write: fx.Node  # index_copy_ / cat producing the keys attention reads
    value_write: fx.Node
    new_key: fx.Node  # this call's keys / values, before they enter the cache
    new_value: fx.Node
    key_cache: fx.Node  # static: the cache tensor written in place; dynamic: the past keys
    value_cache: fx.Node
    positions: fx.Node | None = None  # static: the cache positions written (cache_position)
    dim: int = 2  # the sequence dimension of the cache

    @property
    def is_input(self) -> bool:
        """The cache tensors are graph inputs (a pass may then declare them mutated)."""
        return self.key_cache.op == "placeholder" and self.value_cache.op == "placeholder"


@dataclass
class AttentionMatch:
    node: fx.Node  # the node whose output is the attention output [B, H, Sq, D]
    form: str  # "sdpa" | "matmul_softmax"
    query: fx.Node  # [B, H, Sq, D]
    key: fx.Node  # [B, Hkv, Sk, D], before any GQA repeat
    value: fx.Node
    scale: float  # the softmax scale, resolved (SDPA's default: 1/sqrt(D))
    causal: bool  # SDPA's is_causal; a causal *mask* reads as ``mask``
    mask: fx.Node | None  # additive float or boolean mask, as the model passed it
    groups: int  # query heads per key/value head (1: plain multi-head attention)
    gqa: str  # "none" | "repeat" (repeat_kv in the graph) | "enable_gqa" (SDPA's flag)
    layer: str  # module path of the attention module ("model.layers.0.self_attn")
    cache: CacheMatch | None = None
    #: the nodes between query/key/value and the output that a rewrite of the whole
    #: attention replaces (repeats, scores, softmax, ...): each is used only inside the match
    inner: list[fx.Node] = field(default_factory=list)

    @property
    def heads(self) -> int:
        return int(val(self.query).shape[1])

    @property
    def head_dim(self) -> int:
        return int(val(self.query).shape[-1])


def _strip(node, targets):
    while is_call(node, *targets):
        node = node.args[0]
    return node


def _unrepeat(node) -> tuple[fx.Node, int, list[fx.Node]]:
    """``(kv, groups, repeat nodes)``: ``kv`` before a GQA repeat (groups 1 if there is none)."""
    if is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        exp = node.args[0]
        if is_call(exp, aten.expand.default) and is_call(exp.args[0], aten.unsqueeze.default):
            uns = exp.args[0]
            v_exp = val(exp)
            if uns.args[1] == 2 and v_exp is not None and v_exp.dim() == 5:
                groups = v_exp.shape[2]
                if isinstance(groups, int) or hasattr(groups, "node") and groups.node.is_constant():
                    return uns.args[0], int(groups), [node, exp, uns]
    if is_call(node, aten.repeat_interleave.self_int):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim is not None and int(dim) % 4 == 1 and isinstance(node.args[1], int):
            return node.args[0], node.args[1], [node]
    return node, 1, []


def _cache(k: fx.Node, v: fx.Node) -> CacheMatch | None:
    if is_call(k, *_CACHE_WRITES) and is_call(v, *_CACHE_WRITES):
        (kc, kdim, kpos, knew), (vc, vdim, vpos, vnew) = k.args[:4], v.args[:4]
        if kdim == vdim and kpos is vpos:
            return CacheMatch("static", k, v, knew, vnew, kc, vc, positions=kpos, dim=int(kdim))
    if is_call(k, aten.cat.default) and is_call(v, aten.cat.default):
        (ks, kdim), (vs, vdim) = (k.args[0], k.args[1] if len(k.args) > 1 else 0), (v.args[0], v.args[1] if len(v.args) > 1 else 0)
        if len(ks) == 2 and len(vs) == 2 and kdim == vdim:
            d = int(kdim) % val(k).dim()
            return CacheMatch("dynamic", k, v, ks[1], vs[1], ks[0], vs[0], dim=d)
    return None


def _layer(ctx: GraphContext, node: fx.Node) -> str:
    return ctx.calling_module(node) or ""


def _only_used_by(nodes: list[fx.Node], allowed: set[fx.Node]) -> bool:
    return all(set(n.users) <= allowed for n in nodes)


def _kv_parts(q, k_rep, v_rep):
    """``(k, v, groups, repeat nodes)`` of 4-D attention inputs, or ``None`` and the reason."""
    vq, vk = val(q), val(k_rep)
    if vq is None or vk is None or vq.dim() != 4 or vk.dim() != 4:
        return None, "query and key are not [batch, heads, tokens, head_dim] tensors"
    k, gk, rk = _unrepeat(k_rep)
    v, gv, rv = _unrepeat(v_rep)
    if gk != gv:
        return None, "keys and values are repeated for a different number of groups"
    return (k, v, gk, rk + rv), None


def _match_sdpa(ctx: GraphContext, node: fx.Node) -> AttentionMatch | NoMatch:
    a = bind_args(node)
    q, k_rep, v_rep = a["query"], a["key"], a["value"]
    if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
        return NoMatch(node, f"attention with dropout (p={a['dropout_p']}): a training graph")
    parts, why = _kv_parts(q, k_rep, v_rep)
    if parts is None:
        return NoMatch(node, why)
    vq = val(q)
    k, v, groups, repeats = parts
    gqa = "repeat" if groups > 1 else "none"
    if a.get("enable_gqa"):
        kv_heads = int(val(k).shape[1])
        groups, gqa = int(vq.shape[1]) // kv_heads * groups, "enable_gqa"
    scale = a.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(vq.shape[-1]))
    inner = list(repeats)
    if inner and not _only_used_by(inner, set(inner) | {node}):
        inner = []  # a repeated key read elsewhere too: a rewrite keeps the repeat
    return AttentionMatch(node=node, form="sdpa", query=q, key=k, value=v, scale=scale, causal=bool(a.get("is_causal")),
                          mask=a.get("attn_mask"), groups=groups, gqa=gqa, layer=_layer(ctx, node),
                          cache=_cache(k, v), inner=inner)


def _match_softmax(ctx: GraphContext, sm: fx.Node) -> AttentionMatch | NoMatch:
    """From a softmax, up to ``q @ k^T`` and down to ``p @ v``."""
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    vs = val(sm)
    if vs is None or vs.dim() != 4 or int(dim) % 4 != 3:
        return NoMatch(sm, "softmax is not over the last dimension of a [batch, heads, queries, keys] tensor")
    inner = [sm]
    # down: p -> [casts, dropout(p=0)] -> matmul(p, v)
    p = sm
    while len(p.users) == 1 and is_call(next(iter(p.users)), *_CASTS, aten.dropout.default, aten.clone.default):
        p = next(iter(p.users))
        if p.target is aten.dropout.default and float(p.args[1]) != 0.0 and (len(p.args) < 3 or p.args[2]):
            return NoMatch(sm, f"attention with dropout (p={p.args[1]}) in training: a training graph")
        inner.append(p)
    out = next(iter(p.users)) if len(p.users) == 1 else None
    if not is_call(out, *_MATMUL) or out.args[0] is not p:
        return NoMatch(sm, "the probabilities do not feed one matmul(p, v)")
    v_rep = out.args[1]
    # up: scores -> [casts] -> [+ mask] -> [* scale | / d] -> matmul(q, k^T)
    s = sm.args[0]
    mask, scale = None, 1.0
    while is_call(s, *_CASTS):
        inner.append(s)
        s = s.args[0]
    if is_call(s, aten.add.Tensor):
        inner.append(s)
        x, m = s.args
        if is_call(m, *_MATMUL, aten.mul.Tensor, aten.div.Tensor) and not is_call(x, *_MATMUL, aten.mul.Tensor, aten.div.Tensor):
            x, m = m, x
        s, mask = x, m
    if is_call(s, aten.mul.Tensor, aten.div.Tensor) and isinstance(s.args[1], (int, float)):
        inner.append(s)
        scale = float(s.args[1]) if s.target is aten.mul.Tensor else 1.0 / float(s.args[1])
        s = s.args[0]
    if not is_call(s, *_MATMUL):
        return NoMatch(sm, "the softmax input is not q @ k^T (scaled, masked)")
    inner.append(s)
    q, kt = s.args
    if not is_call(kt, aten.transpose.int) or {int(d) % 4 for d in kt.args[1:3]} != {2, 3}:
        return NoMatch(sm, "the scores are not q @ k.transpose(-2, -1)")
    inner.append(kt)
    k_rep = kt.args[0]
    parts, why = _kv_parts(q, k_rep, v_rep)
    if parts is None:
        return NoMatch(sm, why)
    k, v, groups, repeats = parts
    inner += repeats
    if not _only_used_by(inner, set(inner) | {out}):
        return NoMatch(sm, "an intermediate of the attention (scores, probabilities) has another use")
    return AttentionMatch(node=out, form="matmul_softmax", query=q, key=k, value=v, scale=scale, causal=False, mask=mask,
                          groups=groups, gqa="repeat" if groups > 1 else "none", layer=_layer(ctx, out),
                          cache=_cache(k, v), inner=inner)


def match_attention(ctx: GraphContext) -> tuple[list[AttentionMatch], list[NoMatch]]:
    """Every attention of the graph in graph order, and the candidates (SDPA calls, softmaxes)
    that were rejected, each with the reason."""
    found, rejected = [], []
    for node in ctx.gm.graph.nodes:
        if is_call(node, *_SDPA):
            m = _match_sdpa(ctx, node)
        elif is_call(node, *_SOFTMAX):
            m = _match_softmax(ctx, node)
        else:
            continue
        (found if isinstance(m, AttentionMatch) else rejected).append(m)
    return found, rejected
