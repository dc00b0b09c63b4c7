"""The state contract (passes/README.md): a pass of phase "state" may emit an op that mutates a
declared cache argument that is a graph input, under torch.compile and torch.export; any other
mutation is a PassError. The test pass is Mustafar-like: it replaces the static cache's
``index_copy_`` of this step's keys by an op that writes them with the smaller half (by
magnitude, per token and head) zeroed, found through ``AttentionMatch``'s cache sub-match."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.ir import match_attention
from sparsec.models.llama import tiny_llama


def prune_half(x: torch.Tensor) -> torch.Tensor:
    """Zero the smaller half of ``x`` by magnitude along the last dimension (head_dim)."""
    k = x.shape[-1] // 2
    thr = x.abs().kthvalue(k, dim=-1, keepdim=True).values
    return torch.where(x.abs() > thr, x, torch.zeros((), dtype=x.dtype))


@torch.library.custom_op("sparsec_test::write_pruned_", mutates_args=("cache",))
def write_pruned_(cache: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> None:
    cache.index_copy_(dim, index, prune_half(source))


@write_pruned_.register_fake
def _(cache, dim, index, source):
    return None


class PruneKeysOnWrite(sparsec.Pass):
    name = "test_prune_keys_on_write"
    phase = "state"

    def match(self, ctx, config):
        found, _ = match_attention(ctx)
        return [sparsec.Site(key=m.layer, pass_name=self.name, kind="kv", nodes={"write": m.cache.key_write},
                             weights={}, weight_shapes={}, weight_bytes=0)
                for m in found if m.cache is not None and m.cache.kind == "static" and m.cache.is_input]

    def rewrite(self, ctx, sites, config, plan):
        g = ctx.gm.graph
        for s in sites:
            write = s.nodes["write"]
            cache, dim, index, source = write.args
            with g.inserting_before(write):
                g.call_function(torch.ops.sparsec_test.write_pruned_.default, (cache, dim, index, source))
            write.replace_all_uses_with(cache)  # attention reads the cache, after the write
            g.erase_node(write)
        return bool(sites)


class Plugin:
    @sparsec.hookimpl
    def sparsec_register_passes(self, register):
        register(PruneKeysOnWrite())


class BadPass(PruneKeysOnWrite):
    name = "test_bad_mutation"
    phase = "rewrite"  # mutates without declaring the state phase


@pytest.fixture
def registry():
    from tests.test_plugins import registry_with

    reg = registry_with(Plugin())
    sparsec.plugins.reset_registry(reg)
    return reg


RECIPE = {"passes": {"test_prune_keys_on_write": {}}}


def decode(model, options):
    """A 6-token prompt (eager), then 3 compiled decode steps on a StaticCache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)

    def step(ids, pos):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

    torch._dynamo.reset()
    fn = torch.compile(step, backend="sparsec", options=options, fullgraph=True)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(6), use_cache=True)
        for i in range(3):
            outs.append(fn(torch.tensor([[5 + i]]), torch.tensor([6 + i])))
    return torch.cat(outs, 1), cache


def test_state_pass_mutates_the_cache_under_torch_compile(registry):
    m = tiny_llama()
    sparsec.counters.clear()
    out, cache = decode(m, {"recipe": RECIPE})
    ref, ref_cache = decode(m, {"recipe": RECIPE, "dense_backend": "eager"})  # the rewritten graph, run eagerly
    dense, dense_cache = decode(m, {"recipe": {"passes": {"activation_threshold": {"sparsity": 0}}}})
    assert sparsec.counters["test_prune_keys_on_write"]["sites_rewritten"] >= 2
    k = cache.layers[0].keys[0, :, 6:9]  # the three decoded tokens' keys, written by the pass
    assert float((k == 0).float().mean()) >= 0.5  # half of each head's key zeroed
    torch.testing.assert_close(k, prune_half(dense_cache.layers[0].keys[0, :, 6:9]))
    torch.testing.assert_close(cache.layers[0].values, dense_cache.layers[0].values)  # values untouched
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # Inductor keeps the mutation's order
    assert not torch.allclose(out, dense, atol=1e-3)  # the pruned keys were read by attention


class CachedAttention(nn.Module):
    """One attention step over a static cache held as buffers (what torch.export records as
    buffer mutations)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 2, 8, 16))
        self.register_buffer("v_cache", torch.zeros(1, 2, 8, 16))

    def forward(self, q, k, v, pos):
        keys = self.k_cache.index_copy_(2, pos, k)
        values = self.v_cache.index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, keys, values)


def test_state_pass_under_torch_export(registry):
    q, k, v = (torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pos = torch.tensor([3])
    mod = CachedAttention()
    ep = sparsec.export(mod, (q, k, v, pos), recipe=RECIPE)
    assert mod.k_cache.abs().sum() == 0  # exporting ran nothing on the user's module (the program shares its buffers)
    writes = [n for n in ep.graph.nodes if n.target is torch.ops.sparsec_test.write_pruned_.default]
    assert len(writes) == 1 and writes[0].args[0].op == "placeholder"  # the cache buffer's input
    # functionalized (what Inductor and ONNX see), the program records the cache as mutated
    assert set(ep.run_decompositions().graph_signature.buffers_to_mutate.values()) == {"k_cache", "v_cache"}
    run = ep.module()
    with torch.no_grad():
        out = run(q, k, v, pos)
    torch.testing.assert_close(run.k_cache[:, :, 3:4], prune_half(k))
    ref = CachedAttention()
    ref.k_cache[:, :, 3:4] = prune_half(k)
    ref.v_cache[:, :, 3:4] = v
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, ref.k_cache, ref.v_cache))


def test_mutation_outside_the_state_phase_is_refused():
    from tests.test_plugins import make_plugin, registry_with

    sparsec.plugins.reset_registry(registry_with(make_plugin(BadPass())))
    with pytest.raises(Exception, match="only a state pass .* may mutate"):
        decode(tiny_llama(), {"recipe": {"passes": {"test_bad_mutation": {}}}})


def test_state_passes_run_last(registry):
    from sparsec.pipeline import order_passes

    order = order_passes(registry, ["test_prune_keys_on_write", "activation_threshold", "nm_weights"])
    assert order[-1] == "test_prune_keys_on_write"
