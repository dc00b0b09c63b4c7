"""Real text for calibration and evaluation: CPython's ``pydoc_data`` topics (~465 KB of
English technical prose, ~113k SmolLM2 tokens), installed with every Python.

Windows are fixed and disjoint: calibration windows come from the first half of the token
stream, evaluation windows from the second half, each at a fixed stride, so every number
sparsec reports is measured on text that calibration never saw.
"""

from __future__ import annotations

import torch

__all__ = ["ByteTokenizer", "pydoc_text", "token_stream", "calibration_windows", "evaluation_windows"]

_CACHE: dict[int, torch.Tensor] = {}


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): real text for the tiny random Llama."""

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False) -> dict:
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_stream(tokenizer) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _CACHE:
        ids = tokenizer(pydoc_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        _CACHE[key] = ids
    return _CACHE[key]


def _windows(stream: torch.Tensor, start: int, stop: int, n: int, length: int) -> list[torch.Tensor]:
    avail = (stop - start) // length
    if n > avail:
        raise ValueError(f"asked for {n} windows of {length} tokens; this half of the text holds {avail}")
    # spread the windows over the whole half: a fixed stride, not just the first pages
    stride = max(length, (stop - start) // n)
    return [stream[start + i * stride: start + i * stride + length].unsqueeze(0) for i in range(n)]


def calibration_windows(tokenizer, n: int = 16, length: int = 128, batch: int = 1) -> list[torch.Tensor]:
    """``n`` windows from the first half of the text, grouped ``batch`` at a time."""
    s = token_stream(tokenizer)
    w = _windows(s, 0, len(s) // 2, n, length)
    return [torch.cat(w[i: i + batch]) for i in range(0, n, batch)]


def evaluation_windows(tokenizer, n: int = 8, length: int = 512) -> list[torch.Tensor]:
    """``n`` windows from the second half of the text (never used for calibration)."""
    s = token_stream(tokenizer)
    return _windows(s, len(s) // 2, len(s), n, length)
