"""N:M weights: masks, the compressed format, the kernel, SparseGPT, the pass end to end.

Tolerances: the kernel vs the masked-dense reference, fp32 1e-4 (other summation order),
bf16 2^-7 relative (both accumulate in fp32, one rounding of the output).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsec
from sparsec.errors import PlanError, RecipeError
from sparsec.kernels import nm
from sparsec.models.llama import tiny_llama
from sparsec.passes.nm_weights import NMWeightsConfig, sparsegpt_prune

from .conftest import state_hash

PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (3, 4), (1, 2), (5, 16), (2, 32)]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_keeps_exactly_n_of_m_and_pack_roundtrips(n, m):
    g = torch.Generator().manual_seed(m * 10 + n)
    w = torch.randn(37, 4 * m * 3, generator=g)
    w[0, :m] = 1.0  # ties: the lower indices win, deterministically
    keep = nm.nm_mask(w.abs(), n, m)
    assert (keep.reshape(37, -1, m).sum(-1) == n).all()
    assert keep[0, :n].all() and not keep[0, n:m].any()
    # the kept ones are the largest of each group
    g4 = w.abs().reshape(37, -1, m)
    kept_min = torch.where(keep.reshape(g4.shape), g4, torch.inf).amin(-1)
    dropped_max = torch.where(keep.reshape(g4.shape), -torch.inf, g4).amax(-1)
    assert (kept_min >= dropped_max).all()
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        values, positions = nm.pack(wd, keep, n, m)
        assert values.shape == (37, w.shape[1] // m * n) and positions.dtype == torch.uint8
        assert positions.shape[1] % 4 == 0
        assert torch.equal(nm.unpack(values, positions, n, m, w.shape[1]), wd * keep)


def test_pack_rejects_a_mask_that_is_not_n_of_m():
    w = torch.randn(4, 8)
    keep = nm.nm_mask(w.abs(), 2, 4)
    keep[1, 0] = ~keep[1, 0]
    with pytest.raises(ValueError, match="mask is not 2:4: 1 groups"):
        nm.pack(w, keep, 2, 4)
    with pytest.raises(ValueError, match="n < m"):
        nm.nm_mask(w.abs(), 4, 4)
    with pytest.raises(ValueError, match="m=3 does not divide the 8 input features"):
        nm.nm_mask(w.abs(), 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
@pytest.mark.parametrize("batch", [1, 2, 3, 16, 33])  # 1 and 2: the multi-row 2:4 paths
def test_nm_linear_kernel_matches_masked_dense(dtype, n, m, batch):
    g = torch.Generator().manual_seed(batch + n)
    out_f, in_f = 4099 if batch == 1 else 131, 1000
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    keep = nm.nm_mask(w.abs(), n, m)
    values, positions = nm.pack(w, keep, n, m)
    bias = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    for t in (-1.0, 0.6):  # without / with the TEAL threshold (the fused composition)
        got = torch.ops.sparsec.nm_linear(x, values, positions, bias, n, m, t)
        xs = nm.nm_linear_reference(x, values, positions, bias, n, m, t)
        ref = F.linear(x if t < 0 else sparsec.kernels.activation.threshold_reference(x, t), w * keep, bias)
        torch.testing.assert_close(xs, ref)  # the reference is the masked-dense product
        torch.testing.assert_close(got.float(), ref.float(), **tol)
    # NaN in the input propagates as in the reference
    x[0, 5] = float("nan")
    got = torch.ops.sparsec.nm_linear(x, values, positions, None, n, m, -1.0)
    assert torch.equal(torch.isnan(got), torch.isnan(F.linear(x, w * keep)))


def test_nm_linear_opcheck_and_3d():
    w = torch.randn(24, 32)
    keep = nm.nm_mask(w.abs(), 2, 4)
    v, p = nm.pack(w, keep, 2, 4)
    x = torch.randn(2, 3, 32)
    torch.library.opcheck(torch.ops.sparsec.nm_linear.default, (x, v, p, None, 2, 4, -1.0))
    torch.library.opcheck(torch.ops.sparsec.nm_linear.default, (x, v, p, None, 2, 4, -1.0, True))
    torch.testing.assert_close(torch.ops.sparsec.nm_linear(x, v, p, None, 2, 4, -1.0), F.linear(x, w * keep),
                               atol=1e-5, rtol=1e-5)


def _sparsegpt_float64(W, H, n, m, damp):
    """SparseGPT written plainly: one column at a time, no lazy blocks, float64."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            score = W[:, j:j + m] ** 2 / torch.diag(U)[j:j + m] ** 2
            drop = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
            pruned[:, j:j + m].scatter_(1, drop, True)
        q = torch.where(pruned[:, j], 0.0, W[:, j])
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        W[:, j] = q
    return W, ~pruned


def test_sparsegpt_matches_a_plain_float64_implementation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 48, generator=g) * torch.linspace(0.2, 3, 48)  # uneven input scales
    W = torch.randn(20, 48, generator=g)
    H = X.T @ X
    cfg = NMWeightsConfig(n=2, m=4, method="sparsegpt", blocksize=16)
    ours, keep = sparsegpt_prune(W, H, cfg)
    ref, ref_keep = _sparsegpt_float64(W, H, 2, 4, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    assert (keep.reshape(20, -1, 4).sum(-1) == 2).all() and torch.equal(ours == 0, ~keep)
    # and it beats magnitude and Wanda on the layer's output error, as it should
    def err(Wp):
        return float((X @ (W - Wp).T).pow(2).sum())

    mag = W * nm.nm_mask(W.abs(), 2, 4)
    wanda = W * nm.nm_mask(W.abs() * X.pow(2).sum(0).sqrt(), 2, 4)
    assert err(ours) < err(wanda) < err(mag)


@pytest.mark.parametrize("recipe,match", [
    ({"n": 4, "m": 4}, "n must be smaller than m"),
    ({"n": 5, "m": 4}, "n must be smaller than m"),
    ({"n": 2, "m": 1}, "m >= 2"),
    ({"method": "sparsgpt"}, "did you mean 'sparsegpt'"),
    ({"mthod": "wanda"}, "did you mean 'method'"),
    ({"structure": "blocked"}, "structure must be 'nm' or 'unstructured'"),
    ({"structure": "unstructured", "sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"n": 2.0}, "n must be an integer"),
    ({"dense_copy": "yes"}, "dense_copy must be true or false"),
    ({"sparsity": 0.7}, "sparsity applies to structure 'unstructured'.*removes 50%"),
    ({"structure": "unstructured", "n": 1, "m": 4}, "n and m apply to structure 'nm'"),
])
def test_bad_nm_recipes(recipe, match):
    with pytest.raises(RecipeError, match=match):
        sparsec.resolve_recipe({"passes": {"nm_weights": recipe}})


def test_nm_with_cats_is_refused():
    with pytest.raises(RecipeError, match="does not compose with activation_threshold mode 'cats'"):
        sparsec.resolve_recipe({"passes": {"activation_threshold": {"mode": "cats", "sparsity": 0.5},
                                           "nm_weights": {"n": 2, "m": 4}}})


def _dense_reference(model, plan):
    """The model with every pruned weight swapped in (what the rewrite must equal)."""
    ref = copy.deepcopy(model)
    for key, e in plan.sites.items():
        if e["pass"] != "nm_weights":
            continue
        w = ref.get_parameter(e["weights"]["weight"])
        if e["structure"] == "nm":
            dense = nm.unpack(plan.tensors[f"{key}.values"], plan.tensors[f"{key}.positions"], e["n"], e["m"], w.shape[1])
        else:
            dense = plan.tensors[f"{key}.weight"]
        with torch.no_grad():
            w.copy_(dense)
    return ref


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_compile_and_export_2of4(tiny, tiny_batches, method, tmp_path):
    before = state_hash(tiny)
    recipe = {"passes": {"nm_weights": {"n": 2, "m": 4, "method": method}}}
    plan = sparsec.calibrate(tiny, tiny_batches, recipe, progress=False)
    # 2 layers x 7 linears; lm_head and embeddings ignored
    assert len(plan.sites) == 14 and all(k.endswith(":nm") for k in plan.sites)
    plan.save(tmp_path / "p.sparsec")
    plan = sparsec.Plan.load(tmp_path / "p.sparsec")
    for key, e in plan.sites.items():
        keep = nm.unpack(plan.tensors[f"{key}.values"], plan.tensors[f"{key}.positions"], 2, 4,
                         e["weight_shapes"]["weight"][1]) != 0
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all()
    ref_model = _dense_reference(tiny, plan)
    x = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        ref = ref_model(x).logits
        out = torch.compile(tiny, backend="sparsec", options={"plan": plan}, fullgraph=True)(x).logits
        ep = sparsec.export(tiny, (x,), plan=plan)
        exported = ep.module()(x).logits
    # q/k/v and gate/up share an input: one call each over their stacked rows (4 per layer)
    assert sum("sparsec.nm_linear" in str(n.target) for n in ep.graph.nodes) == 8
    # the compressed weights are lifted constants of the program: it saves and loads whole
    assert sum("lifted_tensor" in k for k in ep.constants) == 16  # values + positions per call
    torch.export.save(ep, tmp_path / "ep.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "ep.pt2").module()(x).logits, exported)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exported, ref, atol=1e-4, rtol=1e-4)
    assert state_hash(tiny) == before


def test_teal_and_2of4_compose_into_one_op(tiny, tiny_batches):
    recipe = {"passes": {"activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform"},
                         "nm_weights": {"n": 2, "m": 4, "method": "wanda"}}}
    plan = sparsec.calibrate(tiny, tiny_batches, recipe, progress=False)
    x = torch.randint(0, 256, (1, 9))
    made = []

    def spy(gm, ex):
        out = sparsec.sparsec_backend(gm, ex, options={"plan": plan, "dense_backend": "eager"})
        made.append(out)
        return out

    with torch.no_grad():
        out = torch.compile(tiny, backend=spy)(x).logits
    gm = getattr(made[0], "fn", made[0])
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("sparsec.nm_linear" in t for t in targets) == 8  # q/k/v and gate/up fused
    nm_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "sparsec.nm_linear" in str(n.target)]
    assert all(n.args[7] is True for n in nm_nodes)  # dense_copy by default: prefill at dense speed
    assert not any("threshold_linear" in t or "sparse_linear" in t for t in targets)
    # reference: masked-dense weights and TEAL thresholds applied by hand
    ref_model = _dense_reference(tiny, plan)
    hooks = []
    for key, e in plan.sites.items():
        if e["pass"] == "activation_threshold" and e["sparsity"] > 0:
            t = e["threshold"]
            hooks.append(ref_model.get_submodule(key).register_forward_pre_hook(
                lambda m, a, t=t: (sparsec.kernels.activation.threshold_reference(a[0], t),)))
    with torch.no_grad():
        ref = ref_model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_m_not_dividing_inputs_is_left_dense_with_a_warning():
    mlp = torch.nn.Sequential(torch.nn.Linear(30, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = sparsec.calibrate(mlp, [torch.randn(4, 30)], {"passes": {"nm_weights": {"n": 1, "m": 4}}},
                                 progress=False)
    assert list(plan.sites) == ["2:nm"]
    assert any("m=4 does not divide the inputs of 1 linear" in str(x.message) for x in w)


def test_compile_without_plan_scores_on_example_inputs():
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = torch.compile(mlp, backend="sparsec", options={
                "recipe": {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "wanda"}}}})(x)
    w0, w2 = mlp[0].weight.detach(), mlp[2].weight.detach()
    # Wanda statistics come from the dense graph on the example inputs
    h_dense = torch.relu(F.linear(x, w0, mlp[0].bias))
    k0 = nm.nm_mask(w0.abs() * x.pow(2).sum(0).sqrt(), 2, 4)
    k2 = nm.nm_mask(w2.abs() * h_dense.pow(2).sum(0).sqrt(), 2, 4)
    ref = F.linear(torch.relu(F.linear(x, w0 * k0, mlp[0].bias)), w2 * k2, mlp[2].bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_semi_structured_route_only_where_tensor_cores_can_win():
    """CUDA prefill of 2:4 half-precision weights goes to cuSPARSELt/CUTLASS; everything else
    (decode sizes, other patterns, fp32, pre-Ampere, shapes outside the backends' tiles) not."""
    r = nm.semi_structured_route
    big = dict(out_features=4096, in_features=4096, n=2, m=4)
    assert r(512, dtype=torch.bfloat16, capability=(9, 0), **big) == "cusparselt"
    assert r(512, dtype=torch.float16, capability=(8, 0), backends=("cutlass",), **big) == "cutlass"
    assert r(16, dtype=torch.bfloat16, capability=(9, 0), **big) is None            # decode: Triton GEMV
    assert r(nm.SEMI_STRUCTURED_MIN_TOKENS - 1, dtype=torch.bfloat16, capability=(9, 0), **big) is None
    assert r(512, dtype=torch.float32, capability=(9, 0), **big) is None           # no fp32 tensor-core 2:4 here
    assert r(512, dtype=torch.bfloat16, capability=(7, 5), **big) is None          # Turing: no sparse cores
    assert r(512, dtype=torch.bfloat16, capability=None, **big) is None
    assert r(512, 4096, 4096, 4, 8, torch.bfloat16, (9, 0)) is None                # 4:8 is not the hardware's
    assert r(512, 4096, 4096, 1, 4, torch.bfloat16, (9, 0)) is None
    assert r(512, 256, 256, 2, 4, torch.bfloat16, (9, 0)) is None                  # tiny: launch-bound
    # 4104 rows: a multiple of 8, not of 16 or 32 -> neither backend's tile
    assert r(512, 4104, 4096, 2, 4, torch.bfloat16, (9, 0)) is None
    # 4112 x 4112: cuSPARSELt's 16-multiples fit, CUTLASS's 64 columns do not
    assert r(512, 4112, 4112, 2, 4, torch.bfloat16, (9, 0)) == "cusparselt"
    assert r(512, 4112, 4112, 2, 4, torch.bfloat16, (9, 0), backends=("cutlass",)) is None


def test_cpu_tensors_never_take_the_cuda_route():
    x = torch.randn(40, 64)
    w = torch.randn(32, 64)
    v, p = nm.pack(w, nm.nm_mask(w.abs(), 2, 4), 2, 4)
    from sparsec.kernels.nm.triton import nm_linear_cuda

    torch.testing.assert_close(nm_linear_cuda(x, v, p, None, 2, 4, -1.0),
                               nm.nm_linear_reference(x, v, p, None, 2, 4, -1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16), (1, 2)])
def test_cpp_unpack_is_exactly_the_reference_unpack(dtype, n, m):
    """The C++ unpack feeds the prefill path (> 16 tokens): bit-exact with the torch one."""
    from sparsec.kernels import cpu

    ext = cpu.extension()
    assert ext is not None, "the C++ kernels must build on the CI machine"
    g = torch.Generator().manual_seed(n * 31 + m)
    # odd row count; widths with and without a tail after the 16-column vector path
    for out_f, in_f in ((37, m * 23), (5, m * 16)):
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        v, p = nm.pack(w, nm.nm_mask(w.abs().float(), n, m), n, m)
        got = ext.nm_unpack(v, p, n, m, in_f)
        assert torch.equal(got, nm.unpack(v, p, n, m, in_f))
    with pytest.raises(RuntimeError, match="do not fit"):
        ext.nm_unpack(v, p, n, m, in_f + m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [(61, 96), (203, 4096)])  # one GEMM; blocks of 64/128 rows + a tail
def test_prefill_sized_input_matches_masked_dense(dtype, out_f, in_f):
    g = torch.Generator().manual_seed(out_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    keep = nm.nm_mask(w.abs().float(), 2, 4)
    v, p = nm.pack(w, keep, 2, 4)
    b = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(3, 7, in_f, generator=g).to(dtype)  # 21 tokens: above the kernel's 16, unpack + GEMM
    for t in (-1.0, 0.5):
        xs = x if t < 0 else sparsec.kernels.activation.threshold_reference(x, t)
        got = torch.ops.sparsec.nm_linear(x, v, p, b, 2, 4, t)
        # fp32: the kernel's GEMM on its masked dense copy and F.linear sum in_f products in
        # orders of their own (MKL picks by ISA: on an AVX2 machine 203x4096 differed by 8.8e-5
        # where outputs are ~45); rounding grows like sqrt(in_f), so the budget does too (2.6e-4
        # at 4096, a few ulps of |y|). A wrong mask or position moves outputs by ~1. bf16: torch's
        # default (one bf16 ulp relative).
        tol = dict(atol=4e-6 * math.sqrt(in_f), rtol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, F.linear(xs, w * keep, b), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_copy_matches_masked_dense_and_follows_its_weight(dtype):
    """Where a dense GEMM wins on CPU (more than 16 tokens), ``dense_copy`` runs it on a masked
    dense copy made once per weight: the same product, remade when the weight changes in
    place, dropped with the weight, and never made for decode-sized calls in fp32."""
    import gc

    ext = sparsec.kernels.cpu.extension()
    if ext is None:
        pytest.skip("the C++ kernels could not be built here")
    g = torch.Generator().manual_seed(7)
    out_f, in_f = 61, 96
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    keep = nm.nm_mask(w.abs().float(), 2, 4)
    v, p = nm.pack(w, keep, 2, 4)
    b = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(3, 7, in_f, generator=g).to(dtype)  # 21 tokens
    gc.collect()
    before = ext.nm_dense_copies(True)
    for t in (-1.0, 0.5):
        xs = x if t < 0 else sparsec.kernels.activation.threshold_reference(x, t)
        got = torch.ops.sparsec.nm_linear(x, v, p, b, 2, 4, t, True)
        torch.testing.assert_close(got, F.linear(xs, w * keep, b))
    assert ext.nm_dense_copies() == before + 1  # one copy for both calls
    if dtype == torch.float32:  # the fp32 kernel wins through 16 tokens: no copy for it
        w2 = torch.randn(out_f, in_f, generator=g)
        v2, p2 = nm.pack(w2, nm.nm_mask(w2.abs(), 2, 4), 2, 4)
        torch.ops.sparsec.nm_linear(x[0, :1], v2, p2, None, 2, 4, -1.0, True)
        assert ext.nm_dense_copies() == before + 1
    with torch.no_grad():
        v.mul_(2)  # in place: the copy must follow
    got = torch.ops.sparsec.nm_linear(x, v, p, None, 2, 4, -1.0, True)
    torch.testing.assert_close(got, F.linear(x, 2 * w * keep))
    del v
    gc.collect()
    assert ext.nm_dense_copies(True) == before  # dropped once its values are gone


def test_teal_with_nm_is_calibrated_on_the_pruned_model(tiny, tiny_batches):
    """In a TEAL + N:M recipe the thresholds come from the activations of the pruned model (what
    the compiled model runs), not of the dense one: the same thresholds as calibrating TEAL
    alone on a copy with the pruned weights swapped in, and the user's model untouched."""
    teal = {"activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform"}}
    before = state_hash(tiny)
    plan = sparsec.calibrate(tiny, tiny_batches, {"passes": {**teal, "nm_weights": {"n": 2, "m": 4}}},
                             progress=False)
    assert state_hash(tiny) == before
    on_pruned = sparsec.calibrate(_dense_reference(tiny, plan), tiny_batches, {"passes": teal}, progress=False)
    on_dense = sparsec.calibrate(tiny, tiny_batches, {"passes": teal}, progress=False)
    keys = [k for k, e in plan.sites.items() if e["pass"] == "activation_threshold"]
    assert keys and set(keys) == {k for k in on_pruned.sites}
    for k in keys:
        assert plan.sites[k]["threshold"] == pytest.approx(on_pruned.sites[k]["threshold"], rel=1e-6), k
    moved = [k for k in keys if plan.sites[k]["threshold"] != pytest.approx(on_dense.sites[k]["threshold"], rel=1e-3)]
    assert len(moved) >= len(keys) // 2  # pruning upstream weights moves most sites' thresholds


def test_compiled_prefill_uses_dense_copies_freed_with_the_compiled_model(tiny, tiny_batches):
    """A compiled 2:4 model's prefill (> 16 tokens) makes one dense copy per compressed weight;
    they go when the compiled model does (nothing else would free them)."""
    import gc

    ext = sparsec.kernels.cpu.extension()
    if ext is None:
        pytest.skip("the C++ kernels could not be built here")
    plan = sparsec.calibrate(tiny, tiny_batches, {"passes": {"nm_weights": {"n": 2, "m": 4}}}, progress=False)
    gc.collect()
    before = ext.nm_dense_copies(True)
    x = torch.randint(0, 256, (1, 20))
    compiled = torch.compile(tiny, backend="sparsec", options={"plan": plan, "dense_backend": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, _dense_reference(tiny, plan)(x).logits, atol=1e-4, rtol=1e-4)
    assert ext.nm_dense_copies() == before + 8  # 2 blocks x (q/k/v, o, gate/up, down)
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert ext.nm_dense_copies() == before


def test_gpu_prefill_path_caches_its_dense_weight():
    """The CUDA path above the Triton GEMV's batch (no semi-structured route: here CPU tensors)
    multiplies a cached dense weight with ``dense_copy``: made once, remade after an in-place
    change, gone with the values."""
    import gc

    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(29, 40, generator=g), torch.randn(29, generator=g)
    keep = nm.nm_mask(w.abs(), 2, 4)
    v, p = nm.pack(w, keep, 2, 4)
    x = torch.randn(20, 40, generator=g)
    for dense_copy in (False, True):
        got = nm.nm_linear_cuda_large(x, v, p, b, 2, 4, 0.5, dense_copy)
        torch.testing.assert_close(got, F.linear(sparsec.kernels.activation.threshold_reference(x, 0.5), w * keep, b))
    first = nm.dense_weight(v, p, 2, 4, 40)
    assert nm.dense_weight(v, p, 2, 4, 40) is first
    with torch.no_grad():
        v.mul_(2)
    again = nm.dense_weight(v, p, 2, 4, 40)
    assert again is not first and torch.equal(again, 2 * w * keep)
    held = len(nm._DENSE)
    del v
    gc.collect()
    assert len(nm._DENSE) == held - 1


def test_sparsegpt_targets_with_a_gap_run_the_block_between(tiny_batches):
    """targets [layers.0, layers.2]: layer 2's Hessians come from layer 1's output on layer 0's
    pruned output (layer 1 dense), exactly as if the model had layer 0 pruned and only layer 2
    were calibrated."""
    model = tiny_llama(num_hidden_layers=3)

    def recipe(targets):
        return {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "sparsegpt", "targets": targets}}}

    plan = sparsec.calibrate(model, tiny_batches, recipe(["model.layers.0", "model.layers.2"]), progress=False)
    assert {e["block"] for e in plan.sites.values()} == {"model.layers.0", "model.layers.2"}
    first = sparsec.Plan(recipe=plan.recipe, sites={k: e for k, e in plan.sites.items() if e["block"] == "model.layers.0"},
                         tensors=plan.tensors)
    layer0_pruned = _dense_reference(model, first)
    only2 = sparsec.calibrate(layer0_pruned, tiny_batches, recipe(["model.layers.2"]), progress=False)
    got, want = _dense_reference(model, plan), _dense_reference(layer0_pruned, only2)
    for name, p in want.model.layers[2].named_parameters():
        torch.testing.assert_close(got.model.layers[2].get_parameter(name), p, rtol=1e-5, atol=1e-6)


def test_two_checkpoints_with_their_own_plans(tiny_batches):
    """Two models of one class, each compiled with its own N:M plan, without a reset between:
    torch.compile tells the options apart (plans compare by identity) and each model runs its
    own compressed weights."""
    models = [tiny_llama(seed=s) for s in (0, 1)]
    recipe = {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "magnitude"}}}
    plans = [sparsec.calibrate(m, tiny_batches, recipe, progress=False) for m in models]
    ids = tiny_batches[0]
    with torch.no_grad():
        outs = [torch.compile(m, backend="sparsec", options={"plan": p, "dense_backend": "eager"})(ids).logits
                for m, p in zip(models, plans)]
        for out, m, p in zip(outs, models, plans):
            torch.testing.assert_close(out, _dense_reference(m, p)(ids).logits, rtol=1e-4, atol=1e-4)


def test_sparsegpt_without_damping_on_few_tokens_says_so():
    from sparsec.errors import PassError

    X = torch.randn(8, 32)  # 8 tokens, 32 inputs: X^T X has rank 8
    cfg = NMWeightsConfig(method="sparsegpt", damp=0.0)
    with pytest.raises(PassError, match="not positive definite with damp=0.0; raise damp"):
        sparsegpt_prune(torch.randn(16, 32), X.T @ X, cfg)
    sparsegpt_prune(torch.randn(16, 32), X.T @ X, NMWeightsConfig(method="sparsegpt"))  # the default damping copes


def test_nm_plan_refuses_another_checkpoint(tiny_batches):
    """An N:M plan replaces its sites' weights, so applied to another checkpoint of the
    architecture it would silently run the calibrated one's: it says so instead. A bf16 copy
    of the calibrated model is the same checkpoint and runs."""
    recipe = {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "wanda"}}}
    model = tiny_llama(seed=0)
    plan = sparsec.calibrate(model, tiny_batches, recipe, progress=False)
    ids = tiny_batches[0]
    other = tiny_llama(seed=1)
    with pytest.raises(PlanError, match="made from another checkpoint"):
        sparsec.export(other, (ids,), plan=plan)
    with pytest.raises(Exception, match="made from another checkpoint"), torch.no_grad():
        torch.compile(other, backend="sparsec", options={"plan": plan, "dense_backend": "eager"})(ids)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(half, backend="sparsec", options={"plan": plan, "dense_backend": "eager"})(ids).logits
        ref = _dense_reference(model, plan)(ids).logits
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)  # bf16 vs fp32 over two layers
