"""SmolLM2-135M with real weights on real text (short: a few 128-token windows)."""

import warnings

import pytest
import torch

import sparsec
from sparsec.evaluate import perplexity, sparse_model

pytestmark = pytest.mark.real_model

# Budget: TEAL at 25% costs about +1.3% perplexity on 8 windows of 512 tokens (bench/quality.py);
# on 2 windows of 128 tokens the estimate is noisier, so allow +5%. A broken threshold (say,
# all of every activation dropped) costs orders of magnitude more.
BUDGET_TEAL25 = 0.05


@pytest.fixture(scope="module")
def smol():
    from sparsec.models.llama import smollm2

    return smollm2()


def test_smollm2_is_real(smol):
    model, tok = smol
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(2):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert "Paris" in tok.decode(ids[0])


def test_teal25_within_budget(smol):
    from sparsec.models.data import calibration_windows, evaluation_windows

    model, tok = smol
    ev = evaluation_windows(tok, 2, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(model, calibration_windows(tok, 8, 128, batch=4), "teal-25", progress=False)
    assert len(plan.sites) == 30 * 7
    dense = perplexity(model, ev)
    sparse = perplexity(sparse_model(model, plan), ev)
    assert dense < 30  # real weights (random ones give ~50,000)
    assert sparse / dense - 1 < BUDGET_TEAL25, (dense, sparse)
    assert sparse != dense  # sparsity acts


def test_smollm2_onnx_export_matches_sparsec(smol, tmp_path):
    """2:4 (magnitude) + TEAL 40% (uniform) on SmolLM2, exported to ONNX with compressed N:M
    weights, run in onnxruntime: within 1e-4 of sparsec's own torch output (fp32), on a batch
    and length other than the example's (dynamic axes)."""
    import onnxruntime as ort

    from sparsec.models.data import calibration_windows, evaluation_windows

    model, tok = smol
    recipe = {"passes": {"nm_weights": {"n": 2, "m": 4, "method": "magnitude"},
                         "activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(model, calibration_windows(tok, 2, 64, batch=2), recipe, progress=False)
    example = evaluation_windows(tok, 2, 8)
    path = sparsec.export_onnx(model, (torch.cat(example),), tmp_path / "smol.onnx", plan=plan, progress=False)
    ids = evaluation_windows(tok, 1, 37)[0]
    with torch.no_grad():
        ref = sparsec.export(model, (ids,), plan=plan).module()(ids).logits
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(s.run(None, {"input_ids": ids.numpy()})[0])
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert got.argmax(-1).eq(ref.argmax(-1)).float().mean() > 0.97
    # compressed: the file is well under the dense 540 MB (fp32 2:4 keeps 0.56 of each pruned weight)
    assert path.stat().st_size < 0.75 * sum(p.numel() * 4 for p in model.parameters())
