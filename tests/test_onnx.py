"""ONNX export: every sparsec op lowers to standard ONNX, the file passes the full checker, runs
in onnxruntime and matches sparsec's own torch output.

Tolerance: fp32, 1e-4 of the largest logit (the issue's budget). The ONNX graph computes the
same products in another order (onnxruntime's MatMul vs MKL's), so exact equality is not
expected; measured differences here are ~5e-7 relative.
"""

from __future__ import annotations

import hashlib
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch

import sparsec
import sparsec.kernels.activation  # noqa: F401  (defines the sparsec:: ops)
import sparsec.kernels.nm  # noqa: F401
from sparsec.errors import ExportError
from sparsec.onnx_export import custom_ops

RTOL = 1e-4


@pytest.fixture(scope="module")
def plans(tiny, tiny_batches):
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in ("teal-40", "cats-50", "magnitude-24", "sparsegpt-24-teal-40"):
            out[r] = sparsec.calibrate(tiny, tiny_batches, r, progress=False)
        out["4:8-wanda"] = sparsec.calibrate(
            tiny, tiny_batches, {"passes": {"nm_weights": {"n": 4, "m": 8, "method": "wanda"}}}, progress=False)
    return out


def run_onnx(path, ids: torch.Tensor) -> torch.Tensor:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["input_ids"]
    assert s.get_outputs()[0].name == "logits"
    return torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])


def sparsec_logits(model, plan, ids) -> torch.Tensor:
    with torch.no_grad():
        return sparsec.export(model, (ids,), plan=plan).module()(ids).logits


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("recipe,fmt", [
    ("teal-40", "compressed"),
    ("cats-50", "compressed"),
    ("magnitude-24", "compressed"),
    ("magnitude-24", "dense"),
    ("sparsegpt-24-teal-40", "compressed"),
    ("sparsegpt-24-teal-40", "dense"),
    ("4:8-wanda", "compressed"),
])
def test_export_runs_in_onnxruntime_and_matches(tiny, tiny_batches, plans, tmp_path, recipe, fmt):
    path = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "m.onnx", plan=plans[recipe], nm_format=fmt,
                               progress=False)
    onnx.checker.check_model(str(path), full_check=True)
    # dynamic axes: another batch size and sequence length than the [2, 24] example
    for shape in ((3, 17), (1, 5)):
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(sum(shape)))
        ref = sparsec_logits(tiny, plans[recipe], ids)
        got = run_onnx(path, ids)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < RTOL, (recipe, fmt, shape)
    # and the sparsity is really in there: the dense model differs by far more
    with torch.no_grad():
        dense = tiny(ids).logits
    assert rel_err(dense, ref) > 100 * RTOL


def _initializer_bytes(path) -> dict[str, int]:
    m = onnx.load(str(path))
    return {i.name: onnx.numpy_helper.to_array(i).nbytes for i in m.graph.initializer}


def test_compressed_nm_keeps_values_and_positions(tiny, tiny_batches, plans, tmp_path):
    plan = plans["magnitude-24"]
    comp = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "c.onnx", plan=plan, progress=False)
    dense = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "d.onnx", plan=plan, nm_format="dense",
                                progress=False)
    mc = onnx.load(str(comp))
    kinds = {(i.data_type, len(i.dims)) for i in mc.graph.initializer}
    assert (onnx.TensorProto.UINT8, 2) in kinds  # packed positions are in the file
    assert "ReduceSum" in {n.op_type for n in mc.graph.node}  # the expansion is in the graph
    assert onnx.TensorProto.UINT8 not in {i.data_type for i in onnx.load(str(dense)).graph.initializer}
    # the plan's compressed tensors replace the dense weights byte for byte: 2:4 fp32 keeps half
    # the values and adds 2 bits per kept value (rows padded to 4 bytes)
    values = sum(t.nbytes for t in plan.tensors.values() if t.dtype == torch.float32)
    positions = sum(t.nbytes for t in plan.tensors.values() if t.dtype == torch.uint8)
    assert values > 0 and positions > 0
    cb, db = sum(_initializer_bytes(comp).values()), sum(_initializer_bytes(dense).values())
    assert db - cb == pytest.approx(2 * values - values - positions, rel=0.02)


def test_export_is_deterministic(tiny, tiny_batches, plans, tmp_path):
    digests = []
    for i in range(2):
        p = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / f"m{i}.onnx", plan=plans["sparsegpt-24-teal-40"],
                                progress=False)
        digests.append(hashlib.sha256(p.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_external_data_when_weights_exceed_the_limit(tiny, tiny_batches, plans, tmp_path, monkeypatch):
    # the automatic choice (external_data=None) with the 1.8 GiB limit scaled down to this model
    monkeypatch.setattr(sparsec.onnx_export, "_EXTERNAL_DATA_BYTES", 100_000)
    p = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "m.onnx", plan=plans["teal-40"], progress=False)
    assert (tmp_path / "m.onnx.data").stat().st_size > 100_000
    assert p.stat().st_size < (tmp_path / "m.onnx.data").stat().st_size
    ids = tiny_batches[1]
    assert rel_err(run_onnx(p, ids), sparsec_logits(tiny, plans["teal-40"], ids)) < RTOL


def test_example_plugin_translates_its_own_op(tiny, tiny_batches, tmp_path):
    pytest.importorskip("sparsec_spark_topk")
    plan = sparsec.Plan(recipe=sparsec.resolve_recipe("spark-50").to_dict())
    ep = sparsec.export(tiny, (tiny_batches[0],), plan=plan)
    assert "spark_topk::stat_threshold_linear" in {op._name for op in custom_ops(ep)}
    p = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "s.onnx", plan=plan, progress=False)
    ids = tiny_batches[2]
    assert rel_err(run_onnx(p, ids), sparsec_logits(tiny, plan, ids)) < RTOL


def test_op_without_translation_names_op_and_plugin(tiny, tiny_batches, tmp_path):
    from sparsec.plugins import build_registry, plugin_manager, reset_registry

    lib = torch.library.Library("sparsec_test_untranslated", "FRAGMENT")
    lib.define("scaled_linear(Tensor x, Tensor w) -> Tensor")
    lib.impl("scaled_linear", lambda x, w: torch.nn.functional.linear(x, w) * 2, "CompositeExplicitAutograd")
    op = torch.ops.sparsec_test_untranslated.scaled_linear.default

    class ScalePass(sparsec.Pass):
        name = "scale_test"

        def match(self, ctx, config):
            nodes = [n for n in ctx.gm.graph.nodes if n.target is torch.ops.aten.linear.default][:1]
            return [sparsec.Site(key="first", pass_name=self.name, kind="scale", nodes={"linear": n}, weights={},
                                 weight_shapes={}, weight_bytes=0) for n in nodes]

        def rewrite(self, ctx, sites, config, plan):
            for s in sites:
                n = s.nodes["linear"]
                n.target, n.args = op, n.args[:2]
            return True

    class Plugin:
        @sparsec.hookimpl
        def sparsec_register_passes(self, register):
            register(ScalePass())

        @sparsec.hookimpl
        def sparsec_register_kernels(self, register):
            register(op, reference=lambda x, w: torch.nn.functional.linear(x, w) * 2)

    pm = plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="untranslated_plugin")
    reset_registry(build_registry(pm))
    with pytest.raises(ExportError, match=r"'sparsec_test_untranslated::scaled_linear' has no ONNX translation.*"
                                          r"plugin 'untranslated_plugin'"):
        sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "m.onnx", recipe={"passes": {"scale_test": {}}},
                            progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_paths_and_options(tiny, tiny_batches, plans, tmp_path):
    args = (tiny, (tiny_batches[0],))
    with pytest.raises(ExportError, match="directory .*nope.* does not exist"):
        sparsec.export_onnx(*args, tmp_path / "nope" / "m.onnx", plan=plans["teal-40"], progress=False)
    with pytest.raises(ExportError, match="is a directory"):
        sparsec.export_onnx(*args, tmp_path, plan=plans["teal-40"], progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="does not exist"):
        sparsec.export_onnx(*args, tmp_path / "file" / "m.onnx", plan=plans["teal-40"], progress=False)
    with pytest.raises(ExportError, match="'/proc' is not writable"):  # even for root
        sparsec.export_onnx(*args, "/proc/m.onnx", plan=plans["teal-40"], progress=False)
    with pytest.raises(ExportError, match="nm_format must be one of"):
        sparsec.export_onnx(*args, tmp_path / "m.onnx", plan=plans["teal-40"], nm_format="sparse", progress=False)


def test_cli_export_onnx(tmp_path):
    from sparsec.cli import main

    plan_dir = tmp_path / "p.sparsec"
    assert main(["calibrate", "--model", "tiny-llama", "--recipe", "magnitude-24", "--out", str(plan_dir),
                 "--windows", "2", "--length", "32", "--batch", "1"]) == 0
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", "tiny-llama", "--plan", str(plan_dir), "--out", str(out)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["export-onnx", "--model", "tiny-llama", "--plan", str(plan_dir), "--out",
                 str(tmp_path / "missing" / "m.onnx")]) == 2


# ---- each op's translation on its own, odd shapes ------------------------------------------------

class OpModule(torch.nn.Module):
    def __init__(self, fn, *consts):
        super().__init__()
        self.fn = fn
        for i, c in enumerate(consts):
            self.register_buffer(f"c{i}", c) if c is not None else setattr(self, f"c{i}", None)
        self.n = len(consts)

    def forward(self, x):
        return self.fn(x, *[getattr(self, f"c{i}") for i in range(self.n)])


def export_op(module, x, tmp_path):
    from sparsec.plugins import get_registry

    table = {info.op: info.fn for info in get_registry().onnx_translations().values()}
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    path = tmp_path / "op.onnx"
    torch.onnx.export(ep, (x,), str(path), dynamo=True, custom_translation_table=table, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _x(rows, k, nan=False):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows * k))
    if nan:
        x[0, 3], x[1, 5], x[0, 7] = float("nan"), float("inf"), float("-inf")
    return x


def _check(sess, module, rows, k, nan=False):
    x = _x(rows, k, nan)
    with torch.no_grad():
        ref = module(x)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    # ORT's MatMul and sparsec's C++ kernels sum in orders of their own (the kernel's depends on
    # the ISA it was built for): a few fp32 ulps of the largest output, which reaches ~900 for
    # the CATS MLP on these random weights (2.4e-4 apart on an AVX2 build). A wrong mask or
    # threshold moves outputs by whole units.
    finite = ref[torch.isfinite(ref)].abs()
    atol = max(1e-5, 8 * torch.finfo(torch.float32).eps * (float(finite.max()) if finite.numel() else 0.0))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, equal_nan=True)


@pytest.mark.parametrize("bias", [True, False])
def test_threshold_ops_translate(tmp_path, bias):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(37, 61, generator=g), (torch.randn(37, generator=g) if bias else None)
    for op, weight in ((torch.ops.sparsec.threshold_linear.default, w),
                       (torch.ops.sparsec.sparse_linear.default, w.t().contiguous())):
        mod = OpModule(lambda x, w_, b_, op=op: op(x, w_, b_, 0.7), weight, b)
        sess = export_op(mod, _x(3, 61), tmp_path)
        _check(sess, mod, 5, 61)
        _check(sess, mod, 2, 61, nan=True)  # NaN stays NaN, inf passes the threshold


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_cats_ops_translate(tmp_path, activation):
    g = torch.Generator().manual_seed(3)
    gw, gb, uw = torch.randn(45, 29, generator=g), torch.randn(45, generator=g), torch.randn(45, 29, generator=g)
    dw, db = torch.randn(31, 45, generator=g), torch.randn(31, generator=g)
    for op, down in ((torch.ops.sparsec.cats_mlp.default, dw), (torch.ops.sparsec.sparse_cats_mlp.default, dw.t().contiguous())):
        mod = OpModule(lambda x, a, b, c, d, e, op=op: op(x, a, b, c, None, d, e, 0.3, activation), gw, gb, uw, down, db)
        sess = export_op(mod, _x(3, 29), tmp_path)
        _check(sess, mod, 4, 29)


@pytest.mark.parametrize("n,m,threshold", [(2, 4, -1.0), (2, 4, 0.5), (1, 4, -1.0), (4, 8, 0.3), (2, 8, -1.0),
                                           (3, 16, 0.2)])
def test_nm_linear_translates(tmp_path, n, m, threshold):
    from sparsec.kernels.nm import nm_mask, pack

    g = torch.Generator().manual_seed(n * 100 + m)
    k = m * 7  # odd group count
    w = torch.randn(23, k, generator=g)
    values, positions = pack(w, nm_mask(w.abs(), n, m), n, m)
    bias = torch.randn(23, generator=g)
    mod = OpModule(lambda x, v, p, b: torch.ops.sparsec.nm_linear(x, v, p, b, n, m, threshold), values, positions, bias)
    sess = export_op(mod, _x(3, k), tmp_path)
    _check(sess, mod, 6, k)


def test_residual_epilogue_translates(tmp_path):
    """The fused residual add (``residual=``, made by codegen) exports as an Add."""
    from sparsec.kernels.nm import nm_mask, pack

    g = torch.Generator().manual_seed(4)
    w, b, r = torch.randn(37, 64, generator=g), torch.randn(37, generator=g), torch.randn(64, 37, generator=g)
    v, p = pack(w, nm_mask(w.abs(), 2, 4), 2, 4)
    wg, wu = torch.randn(45, 64, generator=g), torch.randn(45, 64, generator=g)
    dwt = torch.randn(45, 37, generator=g)
    ops = {
        "sparse_linear": (lambda x, w_, b_, r_: torch.ops.sparsec.sparse_linear(x, w_, b_, 0.7, residual=x @ r_),
                          w.t().contiguous(), b, r),
        "nm_linear": (lambda x, v_, p_, b_, r_: torch.ops.sparsec.nm_linear(x, v_, p_, b_, 2, 4, 0.5, True,
                                                                               residual=x @ r_), v, p, b, r),
        "sparse_cats_mlp": (lambda x, a, c, d, e, r_: torch.ops.sparsec.sparse_cats_mlp(
            x, a, None, c, None, d, e, 0.3, "silu", residual=x @ r_), wg, wu, dwt, b, r),
    }
    for name, (fn, *consts) in ops.items():
        mod = OpModule(fn, *consts)
        sess = export_op(mod, _x(3, 64), tmp_path)
        _check(sess, mod, 5, 64)
