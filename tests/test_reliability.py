"""Reliability (issue 15): a compiled graph runs the weights it is called with or refuses,
weight changes are seen, a failing pass is rolled back, options are checked first, passes that
match nothing say so, plans calibrated on the fly are freed. Each test failed before its fix."""

import copy
import gc
import warnings
import weakref

import pytest
import torch

import sparsec
from sparsec.models.llama import tiny_llama
from tests.test_activation_threshold import calibrate_quiet, masked_dense

NM = {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "magnitude"}}}


def _notices(seen, text):
    return [w for w in seen if text in str(w.message)]


@pytest.mark.parametrize("as_path", [False, True], ids=["plan", "plan_path"])
def test_reused_compiled_graph_runs_the_callers_weights(tiny_plan, tmp_path, as_path):
    """torch.compile compares options with ==, so a second model of the same class compiled with
    the same plan reuses the first one's compiled code, whose kernels read weight copies
    prepared from the first model. Decode-sized calls (1 and 3 tokens) take the prepared copies;
    before the fix model b ran model a's weights (logits off by ~3)."""
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    plan = tiny_plan
    if as_path:
        plan = str(tmp_path / "p.sparsec")
        tiny_plan.save(plan)
    opts = {"plan": plan}
    ca = torch.compile(a, backend="sparsec", options=opts)
    cb = torch.compile(b, backend="sparsec", options=opts)
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for n in (1, 3, 1):  # a, b, a, b...: each switch must re-bind
            ids = torch.randint(0, 256, (1, n))
            for model, compiled in ((a, ca), (b, cb)):
                torch.testing.assert_close(compiled(ids).logits, masked_dense(model, tiny_plan, ids), atol=1e-5, rtol=1e-5)
    # it says so once per compiled graph (one for 1 token, one for the dynamic length), not per switch
    assert len(_notices(seen, "reused a compiled graph for another model")) == 2


def test_reused_nm_graph_refuses_another_checkpoint(tiny_batches):
    """An N:M plan replaces the weights: the reused graph must refuse another checkpoint
    (before the fix it ran a's compressed weights on b), and accept an exact copy of a."""
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    plan = calibrate_quiet(a, tiny_batches, NM)
    opts = {"plan": plan}
    ids = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        ref = torch.compile(a, backend="sparsec", options=opts)(ids).logits
        with pytest.raises(sparsec.PlanError, match="another model"):
            torch.compile(b, backend="sparsec", options=opts)(ids)
        twin = copy.deepcopy(a)  # other tensors, the same bytes: runs
        torch.testing.assert_close(torch.compile(twin, backend="sparsec", options=opts)(ids).logits, ref)


def test_nm_weight_changed_in_place_refuses(tiny_batches):
    """N:M sites run the plan's weights: an in-place update of the model's weight must not be
    silently ignored (it was: the compiled model kept the old weights)."""
    a = tiny_llama(seed=0)
    plan = calibrate_quiet(a, tiny_batches, NM)
    c = torch.compile(a, backend="sparsec", options={"plan": plan})
    ids = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        c(ids)
        w = a.model.layers[1].mlp.up_proj.weight
        w.copy_(w.clone())  # a version bump with the same bytes (load_state_dict of the same weights): fine
        c(ids)
        w.mul_(1.5)
        with pytest.raises(sparsec.PlanError, match="that weight changed"):
            c(ids)


@pytest.mark.parametrize("how", ["assign_data", "swap_module", "no_grad_inplace"])
def test_weight_changes_the_version_counter_misses_are_seen(tiny_plan, how):
    """``w.data = ...`` keeps the tensor and its version but changes its storage; a swapped-in
    submodule brings new tensors. Both ran stale prepared copies before the fix."""
    m = tiny_llama(seed=2)
    c = torch.compile(m, backend="sparsec", options={"plan": tiny_plan})
    ids = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        c(ids)
        mlp = m.model.layers[0].mlp
        if how == "assign_data":
            mlp.down_proj.weight.data = mlp.down_proj.weight.data * -2.0
        elif how == "swap_module":
            new = torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
            torch.nn.init.normal_(new.weight, std=0.3)
            mlp.up_proj = new
        else:
            mlp.gate_proj.weight.add_(0.25)
        want = masked_dense(m, tiny_plan, ids)
        assert not torch.allclose(want, masked_dense(tiny_llama(seed=2), tiny_plan, ids), atol=1e-3)  # it matters
        torch.testing.assert_close(c(ids).logits, want, atol=1e-5, rtol=1e-5)
