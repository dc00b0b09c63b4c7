"""Both entry points (torch.compile and sparsec.export), compile without import, dense
fallbacks, dynamic shapes, and that compiling never touches the user's model."""

import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import sparsec
from tests.conftest import state_hash
from tests.test_activation_threshold import masked_dense


def test_compile_with_plan_inductor_close_to_reference(tiny, tiny_plan):
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        out = torch.compile(tiny, backend="sparsec", options={"plan": tiny_plan})(ids).logits
    ref = masked_dense(tiny, tiny_plan, ids)
    # Inductor fuses the RMSNorm before each thresholded linear; an activation within an ulp
    # of its threshold can land on the other side, so a few logits move. Budget: the median
    # error stays at fp32 rounding and the worst case is far below the sparsity effect itself.
    err = (out - ref).abs()
    assert float(err.median()) < 1e-4
    assert float(err.max()) < 0.1 * float((ref - tiny(ids).logits).abs().max())


def test_export_matches_compile_and_reference(tiny, tiny_plan):
    ids = torch.randint(0, 256, (2, 13))
    ep = sparsec.export(tiny, (ids,), plan=tiny_plan)
    assert isinstance(ep, torch.export.ExportedProgram)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("sparsec.threshold_linear" in t for t in targets) == sum(e["sparsity"] > 0 for e in tiny_plan.sites.values())
    with torch.no_grad():
        out = ep.module()(ids).logits
    torch.testing.assert_close(out, masked_dense(tiny, tiny_plan, ids), atol=1e-5, rtol=1e-5)


def test_export_cats_and_dynamic_sequence(tiny, tiny_batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, "cats-50", progress=False)
    ids = torch.randint(0, 256, (2, 16))
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = sparsec.export(tiny, (ids,), plan=plan, dynamic_shapes=({1: seq},))
    assert sum("sparsec.cats_mlp" in str(n.target) for n in ep.graph.nodes) == 2
    for n in (5, 31):
        x = torch.randint(0, 256, (2, n))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x).logits, masked_dense(tiny, plan, x), atol=1e-5, rtol=1e-5)


def test_export_with_recipe_calibrates_on_args_and_kwargs(tiny):
    """Without a plan, export calibrates on its own inputs: the positional ones *and* the keyword ones."""
    ids = torch.randint(0, 256, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    with pytest.warns(sparsec.SparsecNotice, match="calibrating on the export inputs"):
        ep = sparsec.export(tiny, (ids,), {"attention_mask": mask}, recipe="teal-40-uniform")
    assert sum("sparsec.threshold_linear" in str(n.target) for n in ep.graph.nodes) == 14
    with torch.no_grad():
        out = ep.module()(ids, attention_mask=mask).logits
    assert out.shape == (2, 13, 256) and torch.isfinite(out).all()


def test_compile_dynamic_shapes_recompile(tiny, tiny_plan):
    compiled = torch.compile(tiny, backend="sparsec", options={"plan": tiny_plan, "dense_backend": "eager"})
    with torch.no_grad():
        for n in (8, 11, 23):  # the second new length makes dynamo go symbolic
            x = torch.randint(0, 256, (1, n))
            torch.testing.assert_close(compiled(x).logits, masked_dense(tiny, tiny_plan, x), atol=1e-5, rtol=1e-5)


def test_fullgraph_tiny_llama(tiny, tiny_plan):
    compiled = torch.compile(tiny, backend="sparsec", options={"plan": tiny_plan}, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 7)))
    assert sparsec.counters["activation_threshold"]["runs"] == 1


def test_compile_does_not_touch_model(tiny, tiny_batches):
    before = state_hash(tiny)
    params_before = {n: p for n, p in tiny.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, "teal-50", progress=False)
        with torch.no_grad():
            torch.compile(tiny, backend="sparsec", options={"plan": plan})(tiny_batches[0])
            sparsec.export(tiny, (tiny_batches[0],), plan=plan).module()(tiny_batches[0])
    assert state_hash(tiny) == before
    assert all(p is params_before[n] for n, p in tiny.named_parameters())
    assert not tiny._forward_pre_hooks and all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny.modules())


def test_fresh_process_compiles_without_import_sparsec(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).eval()
        x = torch.randn(4, 16)
        with torch.no_grad():
            out = torch.compile(m, backend="sparsec", options={"recipe": "teal-50"})(x)
        assert "sparsec" in sys.modules  # loaded by torch through the entry point
        import sparsec
        print("rewritten", sparsec.counters["activation_threshold"]["sites_rewritten"], tuple(out.shape))
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rewritten 2 (4, 8)" in res.stdout


def test_checkout_folder_kernels_does_not_shadow_the_installed_package():
    """The sources' kernels/ folder is sparsec.kernels; Python started in the checkout sees it
    as a top-level ``kernels`` too, which shadowed Hugging Face's ``kernels`` package and broke
    ``import transformers`` (>= 5.25 imports it on load). Fails with the guard in
    kernels/__init__.py removed, wherever that distribution is installed."""
    from importlib import metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent("""
        import os, sys, kernels
        import sparsec.kernels, sparsec.kernels.activation
        assert os.path.dirname(sparsec.kernels.__file__) == os.path.join(os.getcwd(), "kernels")
        print("top-level kernels from", kernels.__file__)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("no installed distribution named kernels to hand over to")
    assert "site-packages" in res.stdout and os.path.join(root, "kernels") not in res.stdout, res.stdout
    # `python bench/quality.py` puts bench/ first on the path, where bench/kernels.py is
    code = "import sys; sys.path.insert(0, 'bench'); import kernels, transformers.activations; print(kernels.__file__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert res.returncode == 0 and "site-packages" in res.stdout, res.stderr[-2000:]


_global_model = None  # a script's top-level ``model``: dynamo names its weights G['_global_model']...


def test_compile_function_using_a_global_or_held_model(tiny, tiny_plan):
    """The plan names sites relative to the model; a compiled function that reaches the model
    through a global (or an attribute of one) must find the same sites, not compile densely."""
    global _global_model
    _global_model = tiny
    holder = types.SimpleNamespace(model=tiny)
    ids = torch.randint(0, 256, (1, 11))
    ref = masked_dense(tiny, tiny_plan, ids)
    expected = sum(e["sparsity"] > 0 for e in tiny_plan.sites.values())
    for fn in (lambda x: _global_model(x).logits, lambda x: holder.model(x).logits):
        torch._dynamo.reset()
        sparsec.counters.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", sparsec.SparsecNotice)  # "no pass matched" would be a failure
            with torch.no_grad():
                out = torch.compile(fn, backend="sparsec", options={"plan": tiny_plan})(ids)
        assert sparsec.counters["activation_threshold"]["sites_rewritten"] == expected
        assert float((out - ref).abs().median()) < 1e-4


def test_plan_for_another_graph_says_so():
    m = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Softmax(-1))
    plan = sparsec.Plan(recipe=sparsec.resolve_recipe("teal-50").to_dict(), sites={"model.layers.0.mlp.up_proj": {"sparsity": 0.5, "threshold": 0.1}})
    with pytest.warns(sparsec.SparsecNotice, match="none of the plan's 1 sites"), torch.no_grad():
        torch.compile(m, backend="sparsec", options={"plan": plan})(torch.randn(3, 8))


def test_grad_graph_compiles_densely_with_notice():
    m = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8)
    with pytest.warns(sparsec.SparsecNotice, match="needs gradients"):
        out = torch.compile(m, backend="sparsec", options={"recipe": "teal-50"})(x)
    out.sum().backward()  # a real training graph: gradients flow
    assert m.weight.grad is not None
    torch.testing.assert_close(out, m(x))
    assert sparsec.counters["activation_threshold"]["runs"] == 0


def test_unmatched_graph_compiles_densely_with_notice():
    m = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Softmax(-1))
    x = torch.randn(3, 8)
    with pytest.warns(sparsec.SparsecNotice, match="no pass matched"), torch.no_grad():
        out = torch.compile(m, backend="sparsec", options={"recipe": "teal-50"})(x)
    torch.testing.assert_close(out, m(x))


def test_debug_dumps(tmp_path, monkeypatch, tiny, tiny_plan):
    monkeypatch.setenv("SPARSEC_DEBUG", str(tmp_path))
    with torch.no_grad():
        torch.compile(tiny, backend="sparsec", options={"plan": tiny_plan, "dense_backend": "eager"})(torch.randint(0, 256, (1, 5)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("activation_threshold_before.txt") for f in files)
    after = next(tmp_path.glob("*activation_threshold_after.txt")).read_text()
    assert "sparsec.threshold_linear" in after


def test_plan_less_options_never_run_another_models_calibration(tiny_batches):
    """Options without a plan calibrate on the fly and are remembered, so a recompile of the
    same model reuses that plan. Another checkpoint of the architecture must never run the
    first one's compressed weights: dynamo hands it the first one's compiled graph (weights
    are graph inputs), which then runs densely with a notice; after a reset, the same
    options calibrate it afresh."""
    from sparsec.models.llama import tiny_llama

    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    opts = {"recipe": {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "magnitude"}}}, "dense_backend": "eager"}
    ids = tiny_batches[0]
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.compile(a, backend="sparsec", options=opts)(ids)
        torch._dynamo.reset()  # the next compile of ``a`` calls the backend again
        torch.compile(a, backend="sparsec", options=opts)(ids)
        assert sum("needs calibration" in str(w.message) for w in seen) == 1  # the recompile reused the plan
        reused = torch.compile(b, backend="sparsec", options=opts)(ids).logits
        assert any("calibrated on the fly for another model" in str(w.message) for w in seen)
        torch._dynamo.reset()
        own = torch.compile(b, backend="sparsec", options=opts)(ids).logits
        torch._dynamo.reset()
        fresh = torch.compile(b, backend="sparsec", options=dict(opts))(ids).logits
        dense = b(ids).logits
    torch.testing.assert_close(reused, dense)
    torch.testing.assert_close(own, fresh, rtol=0, atol=0)
    assert (own - dense).abs().max() > 1e-3  # b's own 2:4 weights, not dense and not a's


def test_model_built_under_inference_mode(tiny, tiny_plan):
    """Weights made under torch.inference_mode keep no version counter (reading it raises):
    the compiled model treats them as fixed instead of failing."""
    from sparsec.models.llama import tiny_llama

    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        m = tiny_llama()  # the same weights as ``tiny``, as inference tensors
        out = torch.compile(m, backend="sparsec", options={"plan": tiny_plan})(ids).logits
    torch.testing.assert_close(out, masked_dense(tiny, tiny_plan, ids), atol=1e-4, rtol=1e-4)
