"""Codegen: the passes' ops lowered to kernels on prepared weights, inside real compiles."""

from __future__ import annotations

import warnings

import pytest
import torch

import sparsec
from sparsec.codegen import RefreshingCallable

from .conftest import state_hash


def _spy(options):
    made = []

    def backend(gm, example_inputs):
        out = sparsec.sparsec_backend(gm, example_inputs, options=options)
        made.append(out)
        return out

    return backend, made


def _targets(compiled) -> list[str]:
    gm = compiled.fn if isinstance(compiled, RefreshingCallable) else compiled
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_lowering_uses_prepared_weights_and_matches_reference(tiny, tiny_plan):
    x = torch.randint(0, 256, (1, 9))
    before = state_hash(tiny)
    with torch.no_grad():
        ref = torch.compile(tiny, backend="sparsec",
                            options={"plan": tiny_plan, "kernels": "reference", "dense_backend": "eager"})(x).logits
        torch._dynamo.reset()
        backend, made = _spy({"plan": tiny_plan, "dense_backend": "eager"})
        out = torch.compile(tiny, backend=backend)(x).logits
    targets = _targets(made[0])
    rewritten = {k: e for k, e in tiny_plan.sites.items() if e["sparsity"] > 0}
    groups = {e["group"] for e in rewritten.values()}
    # linears sharing an input (q/k/v, gate/up) run as one fused call over their weights
    assert sum("sparsec.sparse_linear" in t for t in targets) == len(groups) < len(rewritten)
    assert not any("sparsec.threshold_linear" in t for t in targets)
    prepared = made[0].prepared
    assert sorted(f for p in prepared for f, *_ in p.sources) == sorted(e["weights"]["weight"] for e in rewritten.values())
    for p in prepared:
        assert p.buffer.is_contiguous()
        assert torch.equal(p.buffer, torch.cat([w.detach().t() for _, w, *_ in p.sources], 1))
    # each call also gets its original weight(s), [out, in], for the dense paths (prefill):
    # a lone linear's as `weight`, a group's members' as `group_weights`, in the buffer's order
    for n in made[0].fn.graph.nodes:
        if n.target is torch.ops.sparsec.sparse_linear.default:
            wt = n.args[1].meta["val"]
            group = n.kwargs.get("group_weights")
            originals = [w.meta["val"] for w in group] if group else [n.args[4].meta["val"]]
            assert (not group) == (len(n.args) > 4) and len(originals) in (1, 2, 3)
            assert sum(w.shape[0] for w in originals) == wt.shape[1] and all(w.shape[1] == wt.shape[0] for w in originals)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # prefill-sized input (the dense path on the original weights) matches too
    xp = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch._dynamo.reset()
        refp = torch.compile(tiny, backend="sparsec", options={
            "plan": tiny_plan, "kernels": "reference", "dense_backend": "eager"})(xp).logits
        torch._dynamo.reset()
        outp = torch.compile(tiny, backend="sparsec", options={"plan": tiny_plan})(xp).logits
    torch.testing.assert_close(outp, refp, atol=1e-5, rtol=1e-5)
    assert state_hash(tiny) == before


def test_fullgraph_inductor_and_in_place_weight_change(tiny_plan):
    import copy

    from sparsec.models.llama import tiny_llama

    def mutate(model):  # an optimizer-style in-place update
        model.model.layers[1].mlp.down_proj.weight.mul_(-2.0)
        model.model.layers[0].self_attn.q_proj.weight.add_(0.5)

    def reference(model):
        torch._dynamo.reset()
        return torch.compile(model, backend="sparsec", options={
            "plan": tiny_plan, "kernels": "reference", "dense_backend": "eager"})(x).logits

    m = tiny_llama(seed=3)
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        # references first: a dynamo reset after compiling would recompile the model under test
        # and hide a stale prepared copy
        ref = reference(m)
        changed = copy.deepcopy(m)
        mutate(changed)
        ref2 = reference(changed)
        torch._dynamo.reset()
        sparsec.counters.clear()
        c = torch.compile(m, backend="sparsec", options={"plan": tiny_plan}, fullgraph=True)
        torch.testing.assert_close(c(x).logits, ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ref, ref2, atol=1e-3)  # the update matters
        mutate(m)
        # the prepared (transposed) copies must follow the update, without a recompile
        torch.testing.assert_close(c(x).logits, ref2, atol=1e-5, rtol=1e-5)
        assert sparsec.counters["activation_threshold"]["runs"] == 1


def test_cats_lowered_to_fused_kernel(tiny, tiny_batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, "cats-50", progress=False)
    x = torch.randint(0, 256, (3, 4))
    with torch.no_grad():
        ref = torch.compile(tiny, backend="sparsec",
                            options={"plan": plan, "kernels": "reference", "dense_backend": "eager"})(x).logits
        torch._dynamo.reset()
        backend, made = _spy({"plan": plan})
        out = torch.compile(tiny, backend=backend, fullgraph=True)(x).logits
    assert len(made[0].prepared) == 2  # the two down_proj weights, transposed
    assert all(p.fqn.endswith("mlp.down_proj.weight") and torch.equal(p.buffer, p.param.detach().t())
               for p in made[0].prepared)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the fused op also gets the original down weight, for its dense paths (prefill, and bf16
    # batches whose active channels cover most of the MLP: the library GEMM is faster on it)
    torch._dynamo.reset()
    backend, made = _spy({"plan": plan, "dense_backend": "eager"})
    with torch.no_grad():
        torch.compile(tiny, backend=backend, fullgraph=True)(x)
    gm = made[0].fn
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.sparsec.sparse_cats_mlp.default]
    assert len(ops) == 2
    for n in ops:
        prepared, original = n.args[5].meta["val"], n.kwargs["down_weight"].meta["val"]
        assert n.args[5].op == "get_attr" and original.shape == prepared.t().shape != prepared.shape


def test_decode_step_with_static_cache_fullgraph(tiny, tiny_plan):
    """The decode loop bench/decode.py times: one compiled step on a StaticCache, no breaks."""
    from transformers import StaticCache

    def run(options):
        cache = StaticCache(config=tiny.config, max_cache_len=24)

        def step(ids, pos):
            return tiny(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

        torch._dynamo.reset()
        fn = torch.compile(step, backend="sparsec", options=options, fullgraph=True)
        prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            tiny(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(6), use_cache=True)
            tok, outs = 7, []
            for i in range(5):
                logits = fn(torch.tensor([[tok]]), torch.tensor([6 + i]))
                outs.append(logits)
                tok = int(logits[0, -1].argmax())
        return torch.cat(outs, 1)

    fast = run({"plan": tiny_plan})
    ref = run({"plan": tiny_plan, "kernels": "reference", "dense_backend": "eager"})
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_bad_kernels_option():
    from sparsec.errors import RecipeError

    with pytest.raises(RecipeError, match="kernels must be 'auto' or 'reference', got 'triton'"):
        sparsec.recipes.CompileOptions.from_dict({"recipe": "teal-40", "kernels": "triton"})


@pytest.mark.parametrize("recipe,fused", [
    ({"activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform"}}, 4),  # o_proj, down_proj
    ({"activation_threshold": {"mode": "cats", "sparsity": 0.5}}, 2),  # the CATS MLP of each block
    ({"nm_weights": {"n": 2, "m": 4}}, 4),
])
def test_residual_adds_fused_into_the_kernels(tiny, tiny_batches, recipe, fused):
    """Each block's ``h + o_proj(...)`` and ``h + mlp(...)`` become the kernel's epilogue
    (one launch fewer per linear on GPU), with the same logits as the unfused reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, {"passes": recipe}, progress=False)
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        ref = torch.compile(tiny, backend="sparsec",
                            options={"plan": plan, "kernels": "reference", "dense_backend": "eager"})(x).logits
        torch._dynamo.reset()
        backend, made = _spy({"plan": plan, "dense_backend": "eager"})
        out = torch.compile(tiny, backend=backend, fullgraph=True)(x).logits
    gm = made[0].fn if isinstance(made[0], RefreshingCallable) else made[0]
    with_residual = [n for n in gm.graph.nodes if n.op == "call_function" and n.kwargs.get("residual") is not None]
    assert len(with_residual) == fused
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_residual_fusion_only_where_it_is_exact():
    """No fusion where the add broadcasts, promotes, or the op's output has another user."""
    import torch.fx as fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    import sparsec.kernels.activation  # noqa: F401  (defines the ops)
    from sparsec.codegen import fuse_residual_adds

    def f(x, wt, r, r_row):
        sl = torch.ops.sparsec.sparse_linear.default  # overloads, as in the IR
        a = sl(x, wt, None, 0.1)
        b = sl(x, wt, None, 0.2)
        c = sl(x, wt, None, 0.3)
        add = torch.ops.aten.add.Tensor  # the IR's add (sparsec graphs are ATen-level)
        return add(r, a), add(b, r_row), add(c, r.double()), c

    gm = fx.symbolic_trace(f)
    inputs = (torch.randn(3, 16), torch.randn(16, 11), torch.randn(3, 11), torch.randn(11))
    FakeTensorProp(gm).propagate(*inputs)
    expected = gm(*inputs)
    assert fuse_residual_adds(gm) == 1
    gm.recompile()
    for got, want in zip(gm(*inputs), expected):
        torch.testing.assert_close(got, want)
    assert sum(n.kwargs.get("residual") is not None for n in gm.graph.nodes) == 1


def test_large_prepared_weights_are_huge_page_aligned():
    """lower() puts prepared weights of 2 MiB and more in huge-page memory (kernels/cpu.py,
    empty_huge), with the same values as the transposed weight."""
    from sparsec.kernels.cpu import HUGE_PAGE

    m = torch.nn.Sequential(torch.nn.Linear(1100, 700, bias=False), torch.nn.ReLU(), torch.nn.Linear(700, 5))
    x = torch.randn(1, 1100)
    plan = sparsec.Plan(recipe=sparsec.resolve_recipe("teal-50").to_dict(),
                        sites={"0": {"kind": "teal", "sparsity": 0.5, "threshold": 0.5},
                               "2": {"kind": "teal", "sparsity": 0.5, "threshold": 0.1}})
    backend, made = _spy({"plan": plan})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(m, backend=backend)(x)
    big = [p for p in made[0].prepared if p.buffer.numel() * 4 >= HUGE_PAGE]
    assert len(big) == 1 and torch.equal(big[0].buffer, m[0].weight.detach().t())
    assert big[0].buffer.data_ptr() % HUGE_PAGE == 0
