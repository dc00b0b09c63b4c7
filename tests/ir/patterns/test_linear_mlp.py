"""Golden graphs for ``LinearMatch`` and ``GatedMLPMatch``, the site filter and the rewrite
helpers, on the tiny Llama and on hand-written graphs that must not match."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.ir import SiteFilter, fuse_horizontally, match_gated_mlps, match_linears, replace
from sparsec.models.llama import tiny_llama
from tests.ir.patterns.graphs import dynamo_ctx, export_ctx


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("entry", ["dynamo", "export"])
def test_tiny_llama_linears_and_mlps(llama, entry):
    ids = torch.randint(0, 256, (1, 5))
    ctx = dynamo_ctx(llama, ids) if entry == "dynamo" else export_ctx(llama, (ids,))
    linears, rejected = match_linears(ctx)
    assert rejected == []
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [m.path for m in linears] == [f"model.layers.{i}.{p}" for i in range(2) for p in per_layer] + ["lm_head"]
    q = linears[0]
    assert (q.out_features, q.in_features, q.bias) == (64, 64, None)
    assert q.weight_name == "model.layers.0.self_attn.q_proj.weight" and q.input is linears[1].input
    mlps, rejected = match_gated_mlps(ctx)
    assert rejected == []
    assert [(m.path, m.act_name, m.gate.path, m.up.path, m.down.path) for m in mlps] == [
        (f"model.layers.{i}.mlp", "silu", f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj",
         f"model.layers.{i}.mlp.down_proj") for i in range(2)]


class GeGLU(nn.Module):
    def __init__(self, reuse=False, computed_weight=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.reuse, self.computed_weight = reuse, computed_weight

    def forward(self, x):
        if self.computed_weight:  # a weight made in the graph is no parameter site
            return F.linear(x, self.gate.weight * 2)
        u = self.up(x)
        out = self.down(F.gelu(self.gate(x), approximate="tanh") * u)
        return out + u.sum() if self.reuse else out


def test_gated_mlp_golden_and_must_not_match():
    x = torch.randn(3, 8)
    mlps, _ = match_gated_mlps(dynamo_ctx(GeGLU(), x))
    assert [(m.act_name, m.gate.bias_name) for m in mlps] == [("gelu_tanh", "gate.bias")]
    mlps, rejected = match_gated_mlps(dynamo_ctx(GeGLU(reuse=True), x))
    assert mlps == [] and "another use" in rejected[0].reason
    linears, rejected = match_linears(dynamo_ctx(GeGLU(computed_weight=True), x))
    assert linears == [] and "not a model parameter" in rejected[0].reason


def test_site_filter():
    f = SiteFilter(targets=("mlp.*",), ignore=("layers.1",))
    assert f("model.layers.0.mlp.up_proj") and not f("model.layers.0.self_attn.q_proj")
    assert "ignored" in f.why_not("model.layers.1.mlp.up_proj") and "targets" in f.why_not("lm_head")
    assert SiteFilter()("anything") and not SiteFilter(ignore=("lm_head",))("lm_head")


def test_replace_and_fuse_horizontally(llama):
    """The helpers keep the graph valid and computing the same: q/k/v fused into one linear on
    the concatenated weights, then each linear replaced by an equal call."""
    ids = torch.randint(0, 256, (1, 5))
    ctx = dynamo_ctx(llama, ids)
    linears, _ = match_linears(ctx)
    qkv = linears[:3]
    g = ctx.gm.graph
    ws = [m.weight for m in qkv]
    with g.inserting_before(qkv[0].node):
        cat = g.call_function(torch.ops.aten.cat.default, (ws, 0))
    cat.meta["val"] = torch.cat([w.meta["val"] for w in ws])
    fused = fuse_horizontally([m.node for m in qkv[::-1]],  # any order: graph order decides
                              lambda members: g.call_function(torch.ops.aten.linear.default, (qkv[0].input, cat)),
                              [m.out_features for m in qkv])
    assert sum(n.target is torch.ops.aten.slice.Tensor and n.args[0] is fused for n in g.nodes) == 3
    o = linears[3]
    replace(o.node, torch.ops.aten.linear.default, (o.input, o.weight))
    g.lint()
    ctx.gm.recompile()
    with torch.no_grad():
        out = ctx.gm(*ctx.example_inputs)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, llama(ids).logits)
