"""R-Sparse (issue 16): the op against a float64 reference, the closed-form search against a
direct measurement, the bytes budget, plans, compile/export/ONNX/MLIR, composition rules and
bad configs.

Tolerances. The op is exact for a given mask and factors up to summation order, so it is
compared with the same formula in float64, the mask taken exactly as the op takes it (fp32
product ``|x| s``, then ``!(score <= t)``): fp32 within 2e-5 of the output's largest value
(K up to 64 products of O(1) values, fp32 rounding ~6e-8 each, summation orders differ between
MKL, the C++ kernel and numpy-style sums); bf16 within 1.6e-2 (the output is rounded to bf16,
2^-8 relative, and the factors/weights are bf16 already: the float64 side uses the same bf16
values, so only accumulation order and the final rounding differ).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sparsec
import sparsec.kernels.rsparse as rk
from sparsec.errors import PassError, PlanError, RecipeError
from sparsec.passes.rsparse.search import (
    ALL_ACTIVE, NONE_ACTIVE, best_choice, choices, fixed_choice, layer_svd, planned_weights, rank_for,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def _ref64(x, weight_t, bias, scale, v, us, t):
    """The op's formula in float64 with the op's own mask."""
    m = rk.rsparse_mask(x, scale, t)
    xd = x.double()
    xs, xc = torch.where(m, xd, 0.0), torch.where(m, 0.0, xd)
    y = xs @ weight_t.double() + (xc @ v.double()) @ us.double()
    return y if bias is None else y + bias.double()


def _operands(in_f, out_f, r, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    v = torch.randn(in_f, r, generator=g) / math.sqrt(in_f)
    us = torch.randn(r, out_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    scale = w.norm(dim=0)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(w), cast(v), cast(us), cast(b), scale


def _close(got, want, dtype):
    err = float((got.double() - want).abs().nan_to_num(0).max())
    return err <= TOL[dtype] * max(float(want.abs().nan_to_num(0).max()), 1.0), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,r", [(37, 23, 0), (37, 23, 5), (37, 23, 23), (64, 40, 9)])
@pytest.mark.parametrize("rows", [1, 3, 16, 21])  # 21: beyond MAX_KERNEL_ROWS, the dense path
def test_op_matches_float64_reference(dtype, in_f, out_f, r, rows):
    w, v, us, b, scale = _operands(in_f, out_f, r, dtype, seed=in_f + r + rows)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(dtype)
    t = float(torch.quantile((x.float().abs() * scale).flatten(), 0.5))
    want = _ref64(x, w.t(), b, scale, v, us, t)
    for got in (torch.ops.sparsec.rsparse_linear(x, w, b, scale, v, us, t),
                torch.ops.sparsec.rsparse_linear_t(x, w.t().contiguous(), b, scale, v, us, t, w)):
        assert got.dtype == dtype and got.shape == (rows, out_f)
        ok, err = _close(got, want, dtype)
        assert ok, err


def test_residual_epilogue():
    w, v, us, b, scale = _operands(37, 23, 4, torch.float32)
    x, res = torch.randn(2, 37), torch.randn(2, 23)
    got = torch.ops.sparsec.rsparse_linear_t(x, w.t().contiguous(), b, scale, v, us, 0.3, w, res)
    assert torch.allclose(got.double(), _ref64(x, w.t(), b, scale, v, us, 0.3) + res.double(), atol=1e-5)
    with pytest.raises((ValueError, RuntimeError), match="residual of shape"):  # C++: RuntimeError
        torch.ops.sparsec.rsparse_linear_t(x, w.t().contiguous(), b, scale, v, us, 0.3, w, res[:, :5])


@pytest.mark.parametrize("t,expect", [(ALL_ACTIVE, "dense"), (NONE_ACTIVE, "lowrank")])
def test_all_active_is_the_dense_linear_and_none_active_the_low_rank_one(t, expect):
    w, v, us, b, scale = _operands(29, 17, 4, torch.float32)
    x = torch.randn(2, 29)
    got = torch.ops.sparsec.rsparse_linear(x, w, b, scale, v, us, t)
    want = torch.nn.functional.linear(x, w, b) if expect == "dense" else (x @ v) @ us + b
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_nan_and_inf_inputs_propagate_like_the_dense_linear():
    w, v, us, b, scale = _operands(19, 11, 3, torch.float32)
    x = torch.randn(3, 19)
    x[0, 4] = float("nan")
    x[1, 7] = float("inf")
    for t in (0.5, NONE_ACTIVE):  # a NaN/inf input is active even when nothing else is
        y = torch.ops.sparsec.rsparse_linear(x, w, b, scale, v, us, t)
        assert torch.isnan(y[0]).all()
        assert not torch.isfinite(y[1]).any()
        assert torch.isfinite(y[2]).all()


def test_full_rank_factors_reproduce_the_weight():
    """The SVD factors the plan stores: at rank min(in, out) with no channel active, the op is
    the dense linear (fp32 factors of a float64 SVD: within 1e-5 relative)."""
    torch.manual_seed(0)
    for out_f, in_f in ((23, 37), (37, 23)):
        w = torch.randn(out_f, in_f)
        svd = layer_svd(w, torch.randn(50, in_f))
        q = min(in_f, out_f)
        v, us = svd.v[:, :q], (svd.u[:, :q] * svd.s[:q]).t()
        assert torch.allclose(v @ us, w.t(), atol=1e-5 * float(w.abs().max()))
        x = torch.randn(4, in_f)
        y = torch.ops.sparsec.rsparse_linear(x, w, None, svd.scale, v.contiguous(), us.contiguous(), NONE_ACTIVE)
        assert torch.allclose(y, x @ w.t(), atol=1e-4, rtol=1e-4)


def test_bad_operand_shapes_are_a_clear_error():
    w, v, us, b, scale = _operands(19, 11, 3, torch.float32)
    with pytest.raises(ValueError, match=r"sparsec::rsparse_linear: us has shape \(3, 10\), not \(3, 11\)"):
        torch.ops.sparsec.rsparse_linear(torch.randn(2, 19), w, b, scale, v, us[:, :10], 0.1)


# ---- the search ---------------------------------------------------------------------------


def _low_rank_layer(out_f=48, in_f=40, tokens=300, seed=0):
    """A weight with a decaying spectrum and inputs with heavy-tailed channels: both terms matter."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    vv, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    q = min(in_f, out_f)
    s = torch.logspace(1, -1.5, q)
    w = (u[:, :q] * s) @ vv[:, :q].t()
    x = torch.randn(tokens, in_f, generator=g) * torch.logspace(0.5, -0.5, in_f)
    return w, x


def test_closed_form_error_is_the_measured_error():
    """The search's error of a choice equals ||X W^T - op(X)||^2 / ||X W^T||^2 measured with
    the op and the factors the plan would store."""
    w, x = _low_rank_layer()
    svd = layer_svd(w, x)
    for d in (0.3, 0.5, 0.8):
        for alpha in (0.0, 0.4, 1.0):
            c = fixed_choice(svd, d, alpha)
            v, us = svd.v[:, : c.rank].contiguous(), (svd.u[:, : c.rank] * svd.s[: c.rank]).t().contiguous()
            y = rk.rsparse_linear_reference(x, w, None, svd.scale, v, us, c.threshold).double()
            dense = x.double() @ w.double().t()
            measured = float(((dense - y) ** 2).sum() / (dense**2).sum())
            assert measured == pytest.approx(c.error, rel=1e-3, abs=1e-7), (d, alpha)


def test_budget_is_never_exceeded_and_the_search_beats_a_fixed_split():
    w, x = _low_rank_layer()
    svd = layer_svd(w, x)
    for d in (0.1, 0.25, 0.5, 0.75, 1.0):
        best = best_choice(svd, d, 10)
        assert planned_weights(40, 48, best) <= d * 40 * 48 + 1e-9
        assert best.error <= fixed_choice(svd, d, 0.5).error + 1e-12
        # the threshold gives (about) the planned channels on the calibration tokens
        active = float((svd.scores > best.threshold).float().sum(-1).mean())
        assert abs(active - best.channels) <= 1.0
    # the rank the budget pays for, by hand: 0.5 * 40 * 48 = 960, 10 channels take 480, 480 / 88 -> 5;
    # the whole 1920 on rank: 1920 / 88 -> 21 (full rank, 40, would cost 3520)
    assert rank_for(40, 48, 0.5, 10) == 5 and rank_for(40, 48, 1.0, 0) == 21
    both = choices(svd, [0.3, 0.6], [0, 10, 40])
    assert both[0.3].channels in (0, 10) and 40 * 48 > planned_weights(40, 48, both[0.6])


# ---- recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("section,problem", [
    ({"density": 0}, r"density must be in \(0, 1\]"),
    ({"density": 1.5}, r"density must be in \(0, 1\]"),
    ({"density": float("nan")}, r"density must be in \(0, 1\]"),
    ({"search": "evolution"}, r"search must be one of \['greedy', 'layer', 'fixed'\], got 'evolution'"),
    ({"search": "greedyy"}, r"did you mean 'greedy'"),
    ({"alpha": 0.3}, r"alpha applies to search 'fixed'"),
    ({"search": "fixed", "alpha": 1.2}, r"alpha must be in \[0, 1\]"),
    ({"densty": 0.5}, r"densty"),
])
def test_bad_configs_are_clear_errors(section, problem):
    with pytest.raises(RecipeError, match=problem):
        sparsec.recipes.resolve_recipe({"passes": {"rsparse": section}})


def test_named_recipes():
    for name, d in (("rsparse-50", 0.5), ("rsparse-40", 0.4)):
        r = sparsec.recipes.resolve_recipe(name)
        assert r.passes["rsparse"].density == d and r.passes["rsparse"].search == "greedy"


# ---- the pass on a tiny Llama -------------------------------------------------------------

FIXED = {"passes": {"rsparse": {"density": 0.5, "search": "fixed", "alpha": 0.5}}}


@pytest.fixture(scope="module")
def rs_plan(tiny, tiny_batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsec.calibrate(tiny, tiny_batches, FIXED, progress=False)


def _export_logits(model, plan, ids):
    with torch.no_grad():
        return sparsec.export(model, (ids,), plan=plan).module()(ids).logits


def test_plan_entries_count_their_bytes(tiny, rs_plan):
    assert len(rs_plan.sites) == 14
    for key, e in rs_plan.sites.items():
        out_f, in_f = e["weight_shapes"]["weight"]
        v, us = rs_plan.tensors[f"{key}.v"], rs_plan.tensors[f"{key}.us"]
        assert v.shape == (in_f, e["rank"]) and us.shape == (e["rank"], out_f) and e["rank"] > 0
        # counted from the tensors: the factors, plus the planned active rows of W^T
        assert e["channels"] * out_f + v.numel() + us.numel() <= e["density"] * in_f * out_f + 1e-6
        assert e["error"] <= e["error_fixed_alpha"] + 1e-12
    rows = sparsec.report(rs_plan).rows
    assert all(r["kind"] == "rsparse" and r["bytes_sparse"] < r["bytes_dense"] for r in rows)


def test_compile_and_export_match_and_change_the_output(tiny, rs_plan):
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    ref = _export_logits(tiny, rs_plan, ids)
    with torch.no_grad():
        dense = tiny(ids).logits
        got = torch.compile(tiny, backend="sparsec", options={"plan": rs_plan})(ids).logits
        one = torch.compile(tiny, backend="sparsec", options={"plan": rs_plan})(ids[:1, :1]).logits  # decode: kernels
    assert sparsec.counters["rsparse"]["sites_rewritten"] > 0
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) < 1e-4 * scale
    assert float((one - _export_logits(tiny, rs_plan, ids[:1, :1])).abs().max()) < 1e-4 * scale
    assert float((dense - ref).abs().max()) > 1e-2 * scale  # the rewrite is really there


def test_plan_round_trip(tiny, rs_plan, tmp_path):
    path = rs_plan.save(tmp_path / "rs.sparsec")
    loaded = sparsec.Plan.load(path)
    assert loaded.sites == rs_plan.sites
    assert all(torch.equal(loaded.tensors[k], t) for k, t in rs_plan.tensors.items())
    ids = torch.randint(0, 256, (1, 7))
    assert torch.equal(_export_logits(tiny, loaded, ids), _export_logits(tiny, rs_plan, ids))
    key = next(iter(loaded.sites))
    loaded.tensors[f"{key}.us"] = loaded.tensors[f"{key}.us"][:, :-1]
    with pytest.raises(PlanError, match=rf"site '{key}': tensor '{key}.us' has shape"):
        loaded.check()


def test_another_checkpoint_is_refused(tiny, rs_plan):
    import copy

    other = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    ids = torch.randint(0, 256, (1, 5))
    with pytest.raises(Exception, match="R-Sparse factors for .* were made from another checkpoint"), torch.no_grad():
        torch.compile(other, backend="sparsec", options={"plan": rs_plan})(ids)
    # code compiled for a model refuses a weight changed after the compile (the factors are its SVD's)
    mine = copy.deepcopy(tiny)
    compiled = torch.compile(mine, backend="sparsec", options={"plan": rs_plan})
    with torch.no_grad():
        compiled(ids)
        mine.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        with pytest.raises(PlanError, match="low-rank factors"):
            compiled(ids)


def test_onnx_export_runs_in_onnxruntime(tiny, tiny_batches, rs_plan, tmp_path):
    import onnxruntime as ort

    path = sparsec.export_onnx(tiny, (tiny_batches[0],), tmp_path / "rs.onnx", plan=rs_plan, progress=False)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (3, 11))
    got = torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])
    ref = _export_logits(tiny, rs_plan, ids)
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_mlir_export_decomposes_and_runs(tiny, tiny_batches, rs_plan):
    """The tiny Llama exports to standard dialects only; an MLP (which the execution engine
    can run: the Llama needs tm_tensor) runs and matches sparsec's torch output."""
    from sparsec.mlir_export import export_mlir, run_sparsified
    from tests.test_mlir import MLP

    body = str(export_mlir(tiny, (tiny_batches[0][:1, :6],), plan=rs_plan)).split("{-#")[0]
    assert "sparsec" not in body and "arith.cmpf" in body
    torch.manual_seed(0)
    mlp, x = MLP().eval(), torch.randn(3, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(mlp, [x, torch.randn(5, 28)], FIXED, progress=False)
    got = run_sparsified(export_mlir(mlp, (x,), plan=plan), x)
    with torch.no_grad():
        ref, dense = sparsec.export(mlp, (x,), plan=plan).module()(x), mlp(x)
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((dense - ref).abs().max()) > 1e-2 * float(ref.abs().max())


def test_compile_without_a_plan_searches_on_the_example_inputs(tiny):
    ids = torch.randint(0, 256, (1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            y = torch.compile(tiny, backend="sparsec", options={"recipe": "rsparse-50"})(ids).logits
    assert sparsec.counters["rsparse"]["sites_rewritten"] == 14 and torch.isfinite(y).all()


@pytest.mark.parametrize("other", [
    {"activation_threshold": {"mode": "teal", "sparsity": 0.5, "allocation": "uniform"}},
    {"nm_weights": {"n": 2, "m": 4}},
])
def test_a_linear_claimed_by_two_passes_is_refused_naming_both(tiny, tiny_batches, rs_plan, other):
    name = next(iter(other))
    recipe = {"passes": {**FIXED["passes"], **other}}
    ids = torch.randint(0, 256, (1, 5))
    claim = rf"passes 'rsparse' and '{name}' both claim the linear 'model.layers.0.self_attn.q_proj'"
    with pytest.raises(Exception, match=claim), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.compile(tiny, backend="sparsec", options={"recipe": recipe})(ids)
    with pytest.raises(PassError, match=claim), warnings.catch_warnings():  # before calibrating anything
        warnings.simplefilter("ignore")
        sparsec.calibrate(tiny, tiny_batches, recipe, progress=False)


def test_disjoint_targets_compose_with_teal(tiny, tiny_batches):
    recipe = {"passes": {"rsparse": {"density": 0.5, "search": "layer", "targets": ["mlp"]},
                         "activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform",
                                                  "targets": ["self_attn"]}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, recipe, progress=False)
    kinds = sorted({e["kind"] for e in plan.sites.values()})
    assert kinds == ["rsparse", "teal"]
    ids = torch.randint(0, 256, (1, 6))
    sparsec.counters.clear()  # calibrating TEAL ran rsparse's rewrite first (it probes what compiles)
    with torch.no_grad():
        got = torch.compile(tiny, backend="sparsec", options={"plan": plan})(ids).logits
    counted = {n: sparsec.counters[n]["sites_rewritten"] for n in ("rsparse", "activation_threshold")}
    assert counted == {"rsparse": 6, "activation_threshold": 8}
    ref = _export_logits(tiny, plan, ids)
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
