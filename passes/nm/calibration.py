"""Calibration for ``nm_weights``: masks and pruned weights into the plan.

Runs on the eager model with hooks on the sites' ``nn.Linear`` modules (sites come from the
graph, so only linears the compiled graph really calls are pruned). The user's model is never
modified: SparseGPT prunes a deep copy of one transformer block at a time.
"""

from __future__ import annotations

import copy
import warnings

import torch

from sparsec.calibrate import first_tensor, record_kwargs, split_batch

__all__ = ["calibrate_nm"]


class _Stop(Exception):
    """Raised by the first block's pre-hook: its inputs are all SparseGPT needs from a forward."""


def _linear(model, s):
    try:
        mod = model.get_submodule(s.group)
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.nn.Linear) else None


def _run_all(model, batches):
    with torch.no_grad():
        for batch in batches:
            args, kwargs = split_batch(batch)
            model(*args, **kwargs)


def _stats(model, sites, batches, hessian: bool):
    """Per site: sum of squares of each input feature (Wanda) or ``sum x x^T`` (SparseGPT)."""
    acc, hooks = {}, []
    for s in sites:
        mod = _linear(model, s)

        def hook(m, args, key=s.key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            v = x.T @ x if hessian else x.pow(2).sum(0)
            acc[key] = acc[key] + v if key in acc else v

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        _run_all(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return acc


def calibrate_nm(pass_, model, sites, cfg, batches, progress):
    """``(entries, tensors)`` for the plan: magnitude, Wanda or sequential SparseGPT."""
    from tqdm.auto import tqdm

    from .prune import _mask, sparsegpt_prune, wanda_scores

    entries, tensors = {}, {}

    def add(s, pruned, keep):
        e, t = pass_.entry(s, cfg, pruned, keep, original=model.get_parameter(s.weights["weight"]))
        entries[s.key] = e
        tensors.update(t)

    method = cfg.method
    hookable = [s for s in sites if _linear(model, s) is not None]
    if method != "magnitude" and len(hookable) != len(sites):
        bad = [s.group for s in sites if _linear(model, s) is None][:4]
        warnings.warn(f"sparsec nm_weights: {method} needs nn.Linear modules; sites {bad} are not: "
                      "they use magnitude scores", stacklevel=3)
    others = [s for s in sites if s not in hookable] if method != "magnitude" else list(sites)
    for s in others:
        w = model.get_parameter(s.weights["weight"]).detach()
        keep = _mask(w.abs(), cfg)
        add(s, w * keep, keep)
    if method == "magnitude" or not hookable:
        return entries, tensors

    if method == "wanda":
        stats = _stats(model, hookable, batches, hessian=False)
        for s in tqdm(hookable, desc="sparsec wanda", unit="layer", leave=False, disable=not progress):
            w = model.get_parameter(s.weights["weight"]).detach()
            if s.key not in stats:
                raise RuntimeError(f"calibration never reached {s.group!r}")
            keep = _mask(wanda_scores(w, stats[s.key]), cfg)
            add(s, w * keep, keep)
        return entries, tensors

    # SparseGPT, block by block on the outputs of the already-pruned blocks
    by_block: dict[str, list] = {}
    for s in hookable:
        by_block.setdefault(s.block, []).append(s)
    loose = by_block.pop("", [])
    if loose:  # linears outside numbered blocks: Hessians from the dense model
        H = _stats(model, loose, batches, hessian=True)
        for s in loose:
            w = model.get_parameter(s.weights["weight"]).detach()
            pruned, keep = sparsegpt_prune(w, H[s.key], cfg)
            add(s, pruned, keep)
    blocks = _chain(model, list(by_block))
    if not blocks:
        return entries, tensors
    inputs = []
    first = model.get_submodule(blocks[0])

    def grab(m, args, kwargs):
        inputs.append((tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                       record_kwargs(kwargs)))
        raise _Stop

    h = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = split_batch(batch)
                try:
                    model(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        h.remove()
    for b in tqdm(blocks, desc="sparsec sparsegpt", unit="block", leave=False, disable=not progress):
        if b not in by_block:  # nothing to prune here: pass the activations on through the dense block
            with torch.no_grad():
                inputs = _advance(model.get_submodule(b), inputs)
            continue
        blk = copy.deepcopy(model.get_submodule(b))  # prune a copy: the user's model stays as it is
        mods = {s.key: blk.get_submodule(s.group[len(b) + 1:]) for s in by_block[b]}
        acc, hooks = {}, []
        for key, mod in mods.items():
            def hook(m, args, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                acc[key] = acc[key] + x.T @ x if key in acc else x.T @ x

            hooks.append(mod.register_forward_pre_hook(hook))
        with torch.no_grad():
            try:
                for a, k in inputs:
                    blk(*a, **k)
            finally:
                for hk in hooks:
                    hk.remove()
            for s in by_block[b]:
                lin = mods[s.key]
                pruned, keep = sparsegpt_prune(lin.weight, acc.pop(s.key), cfg)
                lin.weight.copy_(pruned)
                add(s, pruned, keep)
            inputs = _advance(blk, inputs)  # the next block sees this block's pruned outputs
        del blk
    return entries, tensors


def _advance(blk, inputs: list) -> list:
    """Each recorded block call, with its hidden states replaced by ``blk``'s output on them."""
    nxt = []
    for a, k in inputs:
        out = first_tensor(blk(*a, **k))
        if a and isinstance(a[0], torch.Tensor):
            nxt.append(((out, *a[1:]), k))
        else:
            nxt.append((a, {**k, "hidden_states": out}))
    return nxt


def _chain(model, blocks: list[str]) -> list[str]:
    """The blocks from the first to the last one with sites, those in between included: with
    ``targets: [layers.0, layers.2]`` layer 2 must see layer 1's output, not layer 0's."""
    parents = {b.rpartition(".")[0] for b in blocks}
    idx = [b.rpartition(".")[2] for b in blocks]
    if len(parents) != 1 or not all(i.isdigit() for i in idx):
        return blocks
    parent = parents.pop()
    container = model.get_submodule(parent)
    chain = [f"{parent}.{i}" for i in range(min(map(int, idx)), max(map(int, idx)) + 1)]
    return chain if all(c.rpartition(".")[2] in container._modules for c in chain) else blocks
