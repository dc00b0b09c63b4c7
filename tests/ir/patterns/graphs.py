"""Captured ATen graphs for the golden pattern tests, taken as the backend and export take them."""

from __future__ import annotations

import warnings

import torch

from sparsec.capture import capture_dynamo, capture_export


def dynamo_ctx(fn, *args, **kwargs):
    """The GraphContext of the first graph dynamo hands a backend for ``fn(*args, **kwargs)``;
    its real inputs are kept as ``ctx.example_inputs``."""
    out = []

    def backend(gm, example_inputs):
        if not out:
            out.append(capture_dynamo(gm, example_inputs))
            out[0].example_inputs = list(example_inputs)
        return gm

    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(fn, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return out[0]


def export_ctx(model, args, kwargs=None):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_export(model, args, kwargs)[1]


def llama_decode_ctx(model, cache_kind: str):
    """One decode step after a 6-token prompt, on a static or a dynamic cache."""
    from transformers import DynamicCache, StaticCache

    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if cache_kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=24)
            model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(6), use_cache=True)

            def step(ids, pos):
                return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

            return dynamo_ctx(step, torch.tensor([[7]]), torch.tensor([6]))
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)

        def step(ids):
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

        return dynamo_ctx(step, torch.tensor([[7]]))
