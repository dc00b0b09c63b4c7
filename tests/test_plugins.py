"""Plugin loading, registration errors, pass ordering and failure handling."""

import importlib.metadata
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sparsec
from sparsec.errors import PassError, PluginError
from sparsec.hookspecs import SparsecSpec
from sparsec.pipeline import order_passes
from sparsec.plugins import build_registry, plugin_manager, reset_registry


class NamedPass(sparsec.Pass):
    def __init__(self, name, after=(), before=(), fail=False):
        self.name, self.after, self.before, self.fail = name, tuple(after), tuple(before), fail

    def match(self, ctx, config):
        if self.fail:
            raise RuntimeError("boom in match")
        return []


def make_plugin(*passes, raise_in_hook=False):
    class P:
        @sparsec.hookimpl
        def sparsec_register_passes(self, register):
            if raise_in_hook:
                raise KeyError("bad plugin")
            for p in passes:
                register(p)

    return P()


def registry_with(*plugins):
    pm = plugin_manager(load_entrypoints=False)
    for i, p in enumerate(plugins):
        pm.register(p, name=f"test_plugin_{i}")
    return build_registry(pm)


def test_builtins_are_plugins():
    reg = registry_with()
    assert reg.pass_plugin["activation_threshold"] == "sparsec.passes.activation"
    assert {"teal-25", "teal-40", "teal-50", "cats-50"} <= set(reg.recipes)
    assert "sparsec::threshold_linear" in reg.kernels and reg.kernels["sparsec::cats_mlp"].plugin == "sparsec.passes.activation"


def test_example_plugin_found_through_entry_point():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sparsec")}
    assert eps.get("spark_topk") == "sparsec_spark_topk"
    reg = build_registry(plugin_manager())
    assert reg.pass_plugin["spark_topk"] == "spark_topk"
    assert reg.recipes["spark-50"].plugin == "spark_topk"
    assert reg.kernels["spark_topk::stat_threshold_linear"].plugin == "spark_topk"


def test_example_plugin_compiles_and_matches_its_reference():
    from sparsec_spark_topk import stat_threshold_linear_reference

    lin = torch.nn.Linear(33, 21).eval()
    x = torch.randn(4, 33)
    with torch.no_grad():
        out = torch.compile(lin, backend="sparsec", options={"recipe": "spark-50"})(x)
        z = 0.6744897501960817  # Phi^-1(0.75)
        torch.testing.assert_close(out, stat_threshold_linear_reference(x, lin.weight, lin.bias, z), atol=1e-5, rtol=1e-5)
        assert (out - lin(x)).abs().max() > 1e-3
    assert sparsec.counters["spark_topk"]["sites_rewritten"] == 1


def test_disable_autoload_and_trace_env():
    code = "import sparsec; r = sparsec.get_registry(); print(sorted(r.passes))"
    env = dict(os.environ, SPARSEC_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['activation_threshold', 'nm_weights', 'rsparse']"  # built-ins only
    env = dict(os.environ, SPARSEC_TRACE_PLUGINS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "spark_topk" in out.stdout
    assert "sparsec_register_passes() -> spark_topk" in out.stderr and "pass 'spark_topk' from spark_topk" in out.stderr


def test_duplicate_pass_names_name_both_plugins():
    with pytest.raises(PluginError, match=r"two passes named 'activation_threshold'.*sparsec.passes.activation'.*test_plugin_0"):
        registry_with(make_plugin(NamedPass("activation_threshold")))


def test_raising_plugin_hook_is_named():
    with pytest.raises(PluginError, match=r"plugin 'test_plugin_0' raised in sparsec_register_passes: KeyError"):
        registry_with(make_plugin(raise_in_hook=True))


def test_ordering_after_before():
    reg = registry_with(make_plugin(NamedPass("c", after=["b"]), NamedPass("b", after=["a"]), NamedPass("a"),
                                    NamedPass("z", before=["a"])))
    assert order_passes(reg, ["c", "a", "b", "z"]) == ["z", "a", "b", "c"]
    assert order_passes(reg, ["c", "a"]) == ["a", "c"]  # constraints through absent passes are dropped


def test_ordering_cycle_and_unknown_names():
    reg = registry_with(make_plugin(NamedPass("a", after=["b"]), NamedPass("b", after=["a"]), NamedPass("u", after=["nope"])))
    with pytest.raises(PluginError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        order_passes(reg, ["a", "b"])
    with pytest.raises(PluginError, match=r"pass 'u' .* must run after 'nope', which no plugin registers"):
        order_passes(reg, ["u"])


def test_failing_pass_names_plugin_pass_and_predecessors(tiny):
    reg = registry_with(make_plugin(NamedPass("bad", after=["activation_threshold"], fail=True)))
    reset_registry(reg)
    opts = {"recipe": {"passes": {"activation_threshold": {"mode": "teal", "sparsity": 0.3, "allocation": "uniform"}, "bad": {}}},
            "dense_backend": "eager"}
    ids = torch.randint(0, 256, (1, 9))
    with pytest.raises(Exception, match=r"pass 'bad' from plugin 'test_plugin_0' failed after \['activation_threshold'\]: RuntimeError: boom in match"):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.compile(tiny, backend="sparsec", options=opts)(ids)
    torch._dynamo.reset()
    sparsec.counters.clear()
    with pytest.warns(UserWarning, match="skipping pass 'bad'"), torch.no_grad():
        out = torch.compile(tiny, backend="sparsec", options={**opts, "on_plugin_error": "skip"})(ids)
    assert out.logits.shape == (1, 9, 256)
    assert sparsec.counters["bad"]["skipped"] == 1 and sparsec.counters["activation_threshold"]["sites_rewritten"] == 14


def test_every_hook_is_documented():
    hooks = [n for n in vars(SparsecSpec) if n.startswith("sparsec_")]
    assert hooks == ["sparsec_register_passes", "sparsec_register_kernels", "sparsec_register_onnx_translations",
                     "sparsec_register_recipes", "sparsec_register_lowerings", "sparsec_register_decompositions",
                     "sparsec_register_dense_forms"]
    for n in hooks:
        assert len((getattr(SparsecSpec, n).__doc__ or "").strip()) > 40, n
    readme = open(os.path.join(os.path.dirname(__file__), "..", "passes", "README.md")).read()
    for n in hooks:
        assert n in readme, f"{n} is not documented in passes/README.md"
