"""TEAL on a real encoder (BERT): sites are found from graph patterns, not Llama names."""

import warnings

import pytest
import torch

import sparsec

pytestmark = pytest.mark.real_model


def test_minilm_teal_sites_and_embeddings():
    from sparsec.models.minilm import embed, minilm

    model, tok = minilm()
    sents = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    batches = [dict(tok(s, return_tensors="pt")) for s in sents * 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(model, batches, {"passes": {"activation_threshold": {
            "mode": "teal", "sparsity": 0.25, "allocation": "uniform", "ignore": ["pooler"]}}}, progress=False)
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)
    assert len(plan.sites) == 36
    assert "encoder.layer.0.attention.self.query" in plan.sites
    dense = embed(model, tok, sents)
    sparse_model = torch.compile(model, backend="sparsec", options={"plan": plan, "dense_backend": "eager"})
    sparse = embed(sparse_model, tok, sents)
    # budget: at 25% the embeddings stay close to dense (cosine > 0.97) and keep their meaning
    assert float((dense * sparse).sum(-1).min()) > 0.97
    sim = sparse @ sparse.T
    assert sim[0, 1] > sim[0, 2] + 0.2
