"""A third-party plugin (defined here, not shipped) brings its own op with a plain-torch CPU
kernel (no C++), a lowering onto a derived weight, an ONNX translation and an MLIR
decomposition, and is compiled, reported and exported through public hooks only:
``sparsec.Pass``, ``sparsec.ir``, ``sparsec.codegen.Lowering`` and the ``sparsec_register_*``
hooks. Nothing in ``sparsec/`` names it."""

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.codegen import Lowering
from sparsec.ir import SiteFilter, match_linears, replace

CALLS = {"clip_linear_t": 0}


def clip_linear_reference(x, weight, bias, c):
    """``W clamp(x, -c, c) + b``: a toy 'method' that changes what a linear reads."""
    return F.linear(x.clamp(-c, c), weight, bias)


@torch.library.custom_op("seams_test::clip_linear", mutates_args=())
def clip_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, c: float) -> torch.Tensor:
    return clip_linear_reference(x, weight, bias, c)


@clip_linear.register_fake
def _(x, weight, bias, c):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("seams_test::clip_linear_t", mutates_args=())
def clip_linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, c: float,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """The lowered op: reads the transposed weight the lowering prepared (its 'kernel')."""
    CALLS["clip_linear_t"] += 1
    y = x.clamp(-c, c) @ weight_t
    y = y if bias is None else y + bias
    return y if residual is None else y + residual


@clip_linear_t.register_fake
def _(x, weight_t, bias, c, residual=None):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


class ClipInputs(sparsec.Pass):
    name = "clip_inputs"

    @dataclass
    class config_cls:
        c: float = 1.0
        targets: list[str] = field(default_factory=list)
        ignore: list[str] = field(default_factory=list)

    def match(self, ctx, config):
        keep = SiteFilter.of(config)
        found, _ = match_linears(ctx)
        return [sparsec.Site(key=m.path, pass_name=self.name, kind="clip", nodes={"linear": m.node},
                             weights={"weight": m.weight_name}, weight_shapes={"weight": [m.out_features, m.in_features]},
                             weight_bytes=m.weight_bytes) for m in found if keep(m.path)]

    def rewrite(self, ctx, sites, config, plan):
        for s in sites:
            lin = s.nodes["linear"]
            x, w, *rest = lin.args
            replace(lin, torch.ops.seams_test.clip_linear.default, (x, w, rest[0] if rest else None, float(config.c)))
        return bool(sites)

    def report_row(self, key, entry):
        return {"kind": "clip", "target": 0.0, "measured": 0.0, "threshold": float("nan"),
                "bytes_dense": entry["weight_bytes"], "bytes_sparse": entry["weight_bytes"]}


def lower_clip_linear(lctx, nodes):
    g = lctx.ctx.gm.graph
    for node in nodes:
        x, w, b, c = node.args
        fqn, real = lctx.real_weight(w)
        if real is None:
            continue
        wt, _ = lctx.transposed([(fqn, real)], node)
        replace(node, torch.ops.seams_test.clip_linear_t.default, (x, wt, b, c))


def clip_linear_onnx(x, weight, bias, c: float):
    from onnxscript import opset18 as op

    lo = op.CastLike(op.Constant(value_float=-float(c)), x)
    hi = op.CastLike(op.Constant(value_float=float(c)), x)
    y = op.MatMul(op.Clip(x, lo, hi), op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def clip_linear_decomposition(x, weight, bias, c):
    from sparsec.mlir_export import linear_as_mm

    return linear_as_mm(torch.clamp(x, -c, c), weight, bias)


class SeamsPlugin:
    @sparsec.hookimpl
    def sparsec_register_passes(self, register):
        register(ClipInputs())

    @sparsec.hookimpl
    def sparsec_register_kernels(self, register):
        register(torch.ops.seams_test.clip_linear.default, reference=clip_linear_reference, description="clamped linear")

    @sparsec.hookimpl
    def sparsec_register_lowerings(self, register):
        register(torch.ops.seams_test.clip_linear.default, Lowering(prepare=lower_clip_linear))
        register(torch.ops.seams_test.clip_linear_t.default, Lowering(epilogue="residual"))

    @sparsec.hookimpl
    def sparsec_register_onnx_translations(self, register):
        register(torch.ops.seams_test.clip_linear.default, clip_linear_onnx)

    @sparsec.hookimpl
    def sparsec_register_decompositions(self, register):
        register(torch.ops.seams_test.clip_linear.default, clip_linear_decomposition)

    @sparsec.hookimpl
    def sparsec_register_recipes(self, register):
        register("clip-1", {"passes": {"clip_inputs": {"c": 1.0}}}, description="clamp linear inputs to [-1, 1]")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))  # a residual add the lowering folds into the op


def reference(net, x, c=1.0):
    return x + clip_linear_reference(F.relu(clip_linear_reference(x, net.up.weight, net.up.bias, c)),
                                     net.down.weight, net.down.bias, c)


@pytest.fixture
def plugin():
    from tests.test_plugins import registry_with

    sparsec.plugins.reset_registry(registry_with(SeamsPlugin()))


def test_plugin_op_is_compiled_lowered_and_reported(plugin):
    net, x = Net(), torch.randn(2, 5, 16)
    c = torch.compile(net, backend="sparsec", options={"recipe": "clip-1"})
    CALLS["clip_linear_t"] = 0
    with torch.no_grad():
        torch.testing.assert_close(c(x), reference(net, x))
        assert CALLS["clip_linear_t"] == 2  # the lowered op on its prepared weight ran, per linear
        net.up.weight.mul_(0.5)  # the derived (transposed) weight follows an in-place update
        torch.testing.assert_close(c(x), reference(net, x))
    assert sparsec.counters["clip_inputs"]["sites_rewritten"] == 2
    rows = json.loads(sparsec.report(c).to_json())["sites"]
    assert [(r["site"], r["pass"], r["kind"]) for r in rows] == [("up", "clip_inputs", "clip"), ("down", "clip_inputs", "clip")]


def test_plugin_op_exports_to_onnx_and_mlir(plugin, tmp_path):
    import onnxruntime as ort

    net, x = Net(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = reference(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = sparsec.export_onnx(net, (x,), tmp_path / "m.onnx", recipe="clip-1", progress=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)

    module = sparsec.export_mlir(net, (x,), recipe="clip-1")
    assert "seams_test" not in str(module)
    from sparsec.mlir_export import run_sparsified

    torch.testing.assert_close(run_sparsified(module, x), want, atol=1e-5, rtol=1e-5)
