"""Calibration: run the model on sample inputs and decide what the passes need (thresholds...).

The graph is captured exactly as ``torch.compile(..., backend="sparsec")`` captures it, so the
sites calibrated are the sites compiled; probe nodes record histograms at each site. TEAL's
greedy allocation then scores candidate sparsities on held-out batches, block by block, in
eager mode (the block modules are run with thresholds applied to their linears' inputs).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .capabilities import HistogramCalibration, ModelCalibration, PrunesWeights, ScoresOnModel, needs_calibration
from .capture import capture_dynamo
from .errors import PlanError, RecipeError
from .pipeline import Collector, check_claims, insert_probes, order_passes, remove_probes
from .plan import Plan
from .plugins import get_registry
from .recipes import resolve_recipe

__all__ = ["ArgsKwargs", "check_batch", "calibrate", "calibrate_graph", "split_batch", "record_kwargs", "first_tensor", "with_weights",
           "model_scorer", "record_site_inputs"]


@dataclass(frozen=True)
class ArgsKwargs:
    """A calibration batch with positional *and* keyword inputs (what ``sparsec.export`` gets)."""

    args: tuple
    kwargs: dict


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """A batch is a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or
    an ``ArgsKwargs`` of both."""
    if isinstance(batch, ArgsKwargs):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise RecipeError(f"a calibration batch must be a tensor, a tuple of inputs or a dict, not {type(batch).__name__}")


def check_batch(batch: Any, i: int) -> None:
    """A calibration batch that cannot inform anything is an error naming it: an empty tensor
    (no tokens), or a floating tensor with no finite value."""
    args, kwargs = split_batch(batch)
    for where, v in [*((f"input {j}", a) for j, a in enumerate(args)), *((f"input {k!r}", a) for k, a in kwargs.items())]:
        if not isinstance(v, torch.Tensor):
            continue
        if v.numel() == 0:
            raise RecipeError(f"calibration batch {i}: {where} is empty (shape {list(v.shape)}); give batches with tokens")
        if v.is_floating_point() and not bool(torch.isfinite(v).any()):
            raise RecipeError(f"calibration batch {i}: {where} holds no finite value (all NaN or infinite)")


#: keyword arguments of a block call that carry a KV cache: dropped when a block's inputs are
#: recorded for re-running. A re-run with the model's cache object appends its keys/values to
#: the cache again, and attention then reads the *first* run's (dense) keys: sparsifying k/v
#: would look free to the greedy search.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


def record_kwargs(kwargs: dict) -> dict:
    """A block's keyword inputs, detached and cloned, without any KV cache."""
    out = {}
    for k, v in kwargs.items():
        if k in _CACHE_KWARGS:
            out[k] = None
        elif k == "use_cache":
            out[k] = False
        else:
            out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # ModelOutput is a dict
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"cannot find a tensor in a block output of type {type(out).__name__}")


class _BlockScorer:
    """Scores a set of per-site values (thresholds) on one block: relative
    ``||Y_dense - Y_sparse||^2``, with ``transform(input, value)`` applied to each site's input.
    The pass supplies ``transform`` (``scorer_transform``): core names no method."""

    def __init__(self, model: torch.nn.Module, blocks: list[str], batches: list, transform):
        self._thr = transform
        self.model = model
        self.inputs: dict[str, list] = {b: [] for b in blocks}
        hooks = []
        for b in blocks:
            mod = model.get_submodule(b) if b else model

            def grab(m, args, kwargs, b=b):
                detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                self.inputs[b].append((tuple(detach(a) for a in args), record_kwargs(kwargs)))

            hooks.append(mod.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad():
                for batch in batches:
                    args, kwargs = split_batch(batch)
                    model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        self.dense = {b: [self._run(b, a, k) for a, k in self.inputs[b]] for b in blocks}
        self.batches = batches
        self._dense_logp: list[torch.Tensor] | None = None

    def _run(self, block, args, kwargs):
        mod = self.model.get_submodule(block) if block else self.model
        with torch.no_grad():
            return first_tensor(mod(*args, **kwargs)).float()

    def _hook(self, thresholds: dict[str, object]) -> list:
        # a value is whatever the pass's transform takes (a threshold; R-Sparse: its factors);
        # None, or a threshold <= 0, leaves the site dense
        return [self.model.get_submodule(key).register_forward_pre_hook(lambda m, a, t=t: (self._thr(a[0], t), *a[1:]))
                for key, t in thresholds.items() if t is not None and not (isinstance(t, (int, float)) and t <= 0)]

    def _logp(self) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for batch in self.batches:
                args, kwargs = split_batch(batch)
                out.append(torch.log_softmax(first_tensor(self.model(*args, **kwargs)).float(), -1))
        return out

    def model_kl(self, thresholds: dict[str, float]) -> float:
        """Mean ``KL(dense || sparse)`` of the next-token distributions on the held-out batches,
        with every given site thresholded: what a set of thresholds costs the whole model."""
        if self._dense_logp is None:
            self._dense_logp = self._logp()
        hooks = self._hook(thresholds)
        try:
            sparse = self._logp()
        finally:
            for h in hooks:
                h.remove()
        kl = [(d.exp() * (d - s)).sum(-1).mean() for d, s in zip(self._dense_logp, sparse)]
        return float(sum(kl) / len(kl))

    def __call__(self, block: str, thresholds: dict[str, float]) -> float:
        hooks = self._hook(thresholds)
        try:
            num = den = 0.0
            for (a, k), ref in zip(self.inputs[block], self.dense[block]):
                y = self._run(block, a, k)
                num += float((y - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
            return num / max(den, 1e-30)
        finally:
            for h in hooks:
                h.remove()


def record_site_inputs(ctx, sites: list, record, example_inputs) -> None:
    """Run the captured graph once on ``example_inputs`` with ``record(x, site.key)`` called on
    each site's ``nodes["input"]``, then take the recording calls out again: how passes that
    calibrate a compile without a plan (``ModelCalibration.calibrate_graph``) see their inputs.
    ``record`` should be a plain function (FX prints its name into the graph's code)."""
    graph, added = ctx.gm.graph, []
    for s in sites:
        with graph.inserting_after(s.nodes["input"]):
            added.append(graph.call_function(record, (s.nodes["input"], s.key)))
    ctx.gm.recompile()
    try:
        with torch.no_grad():
            ctx.gm(*example_inputs)
    finally:
        for n in added:
            graph.erase_node(n)
        ctx.gm.recompile()


def model_scorer(model: torch.nn.Module, sites: list, batches: list, transform):
    """For passes that calibrate on the model themselves (``ModelCalibration``): the scorer
    ``sparsec.calibrate`` gives histogram passes, with ``transform(input, value)`` applied to
    the input of each site's ``nn.Linear`` (sites keyed by module path). ``scorer(block,
    values)`` is the block's relative output error, ``scorer.model_kl(values)`` the mean
    next-token KL on ``batches``. ``None`` (and the reason) when the sites are not hookable."""
    return _scorer_for(model, sites, batches, transform)


def _scorer_for(model, sites, batches, transform):
    """A block scorer, or ``None`` (with the reason) when the sites are not hookable linears."""
    if not batches:
        return None, "no batches to score on"
    for s in sites:
        try:
            mod = model.get_submodule(s.key)
        except AttributeError:
            return None, f"site {s.key!r} is not a module"
        if not isinstance(mod, torch.nn.Linear):
            return None, f"site {s.key!r} is a {type(mod).__name__}, not an nn.Linear"
    blocks = sorted({s.block for s in sites})
    for b in blocks:
        if b:
            try:
                model.get_submodule(b)
            except AttributeError:
                return None, f"block {b!r} is not a module"
    return _BlockScorer(model, blocks, batches, transform), ""


def calibrate(model: torch.nn.Module, batches: Iterable, recipe: Any = "teal-50", *, progress: bool = True) -> Plan:
    """Run ``model`` on ``batches`` and return a ``Plan`` for ``recipe``.

    ``batches`` is an iterable of model inputs (a tensor, a tuple of positional inputs or a
    dict of keyword inputs). With greedy allocation, the last ``greedy_batches`` batches are
    held out from the histograms and used to score the allocation. The model is not modified.
    """
    from tqdm.auto import tqdm

    recipe = resolve_recipe(recipe)
    reg = get_registry()
    batches = list(batches)
    if not batches:
        raise RecipeError("calibrate: no calibration batches given")
    for i, batch in enumerate(batches):
        check_batch(batch, i)
    todo = {n: c for n, c in recipe.passes.items() if needs_calibration(reg.passes[n], c)}
    plan = Plan(recipe=recipe.to_dict(), meta=Plan.new_meta(model, calibration_batches=len(batches)))
    if not todo:
        return plan

    # passes that score their choices on the model (TEAL's greedy allocation) say how many
    # batches they want held out from the histograms, and how a value acts on a site's input
    transforms = {n: reg.passes[n].scorer_transform(c) if isinstance(reg.passes[n], ScoresOnModel) else None
                  for n, c in todo.items()}
    n_hold = 0
    for name, cfg in todo.items():
        wanted = reg.passes[name].held_out_batches(cfg) if isinstance(reg.passes[name], ScoresOnModel) else 0
        if wanted and len(batches) > 1:
            n_hold = max(n_hold, min(wanted, len(batches) - 1))
    hist_batches = batches[: len(batches) - n_hold]
    held_out = batches[len(batches) - n_hold :] or batches[:1]
    if not n_hold and any(t is not None for t in transforms.values()):
        warnings.warn("sparsec.calibrate: greedy allocation scores its steps on held-out batches, and there are "
                      "none (one batch, or greedy_batches: 0): it scores on a histogram batch and may overfit it. "
                      "Give two or more batches.", stacklevel=2)

    bins = max(getattr(c, "bins", 4096) for c in todo.values())
    found: dict[str, dict[str, object]] = {n: {} for n in todo}  # pass -> site key -> site
    order = order_passes(reg, recipe.passes)
    # weight passes act through the pruned weights (below), not by rewriting the probed graph
    weight_passes = {n for n in todo if isinstance(reg.passes[n], ModelCalibration)}

    def rewriting_before(name: str) -> list[str]:
        """The recipe's passes that run before ``name`` and change the activations it sees."""
        return [n for n in order[: order.index(name)] if n not in weight_passes]

    def probe_backend_for(names, before):
        def probe_backend(gm, example_inputs):
            ctx = capture_dynamo(gm, example_inputs)
            if before:  # probe what the compiled model computes: the earlier passes applied
                ctx = with_passes(ctx, recipe, before, plan, reg)
            for name in names:
                cfg, p = todo[name], reg.passes[name]
                sites = p.match(ctx, cfg)
                for s in sites:
                    found[name].setdefault(s.key, s)
                if isinstance(p, HistogramCalibration):
                    insert_probes(ctx.gm, {f"{name}:{k}": v for k, v in p.probes(ctx, sites, cfg).items()},
                                  Collector.active)  # the collecting one: the backend runs inside `collect`
            return ctx.gm

        return probe_backend

    def collect(net, desc, names=tuple(todo), before=()):
        col = Collector(bins=bins)
        compiled = torch.compile(_fresh_entry(), backend=probe_backend_for(names, before))
        with torch.no_grad(), col:
            for batch in tqdm(hist_batches, desc=desc, unit="batch", disable=not progress):
                args, kwargs = split_batch(batch)
                compiled(net, args, kwargs)
        return col

    collector = collect(model, "sparsec calibrate")
    # two passes claiming one linear is an error: say it now, not after calibrating both
    check_claims({n: list(f.values()) for n, f in found.items()}, reg)

    # Weight passes (SparseGPT, Wanda...) first: the activation passes are then calibrated on
    # the model with the pruned weights, whose activations are what the compiled model sees
    # (thresholds from the dense model's histograms realise another sparsity once the weights
    # feeding them are pruned). The others in pipeline order, each on the activations that the
    # passes before it produce.
    weights_first = sorted(todo, key=lambda n: (n not in weight_passes, order.index(n)))
    pruned: dict[str, torch.Tensor] = {}
    calibrated_on = model
    for name in weights_first:
        cfg, p = todo[name], reg.passes[name]
        if name not in weight_passes and rewriting_before(name):
            found[name] = {}
            if pruned and calibrated_on is model:
                calibrated_on = with_weights(model, pruned)
            before = rewriting_before(name)
            collector = collect(calibrated_on, f"sparsec calibrate ({name}, after {', '.join(before)})", (name,), before)
        sites = list(found[name].values())
        if not sites:
            warnings.warn(f"sparsec: pass {name!r} found no site in {type(model).__name__}", stacklevel=2)
            continue
        if isinstance(p, ModelCalibration):  # passes that calibrate on the eager model themselves
            entries, tensors = p.calibrate_model(model, sites, cfg, batches, progress)
            plan.add_entries(name, entries)
            plan.tensors.update(tensors)
            if isinstance(p, PrunesWeights):
                pruned.update(p.pruned_weights(entries, tensors))
            continue
        if pruned and calibrated_on is model:
            calibrated_on = with_weights(model, pruned)
            collector = collect(calibrated_on, "sparsec calibrate (pruned weights)")
        hists = {k.split(":", 1)[1]: h for k, h in collector.hists.items() if k.startswith(name + ":")}
        scorer = None
        if transforms[name] is not None:
            scorer, why = _scorer_for(calibrated_on, sites, held_out, transforms[name])
            if scorer is not None:
                scorer.progress = progress
            else:
                warnings.warn(f"sparsec: pass {name!r} cannot score its choices on the model here ({why})", stacklevel=2)
        plan.add_entries(name, p.plan_entries(sites, cfg, hists, scorer))
    return plan


_entries = itertools.count()


def _fresh_entry():
    """``model(*args, **kwargs)`` as a function with a code object of its own.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit`` (8), per
    code object. ``torch.compile(model)`` compiles ``nn.Module.__call__``, whose code every
    module shares: each calibration's probed graphs used up that budget, so the ninth
    calibration in a process got no histograms ("calibration data never reached the sites")
    and the user's own compiles after it ran eagerly. These graphs live and die with this
    code object instead."""

    def entry(model, args, kwargs):
        return model(*args, **kwargs)

    entry.__code__ = entry.__code__.replace(co_name=f"sparsec_calibrate_{next(_entries)}")
    return entry


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it except
    ``weights`` (parameter name -> new value): the pruned model, at the memory of the pruned
    weights only, and without touching the user's model."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, shared)
    for name, w in weights.items():
        owner, _, attr = name.rpartition(".")
        mod = view.get_submodule(owner)
        old = getattr(mod, attr)
        setattr(mod, attr, torch.nn.Parameter(w.to(dtype=old.dtype, device=old.device), requires_grad=False))
    return view


def with_passes(ctx, recipe, names: list[str], plan: Plan, reg) -> Any:
    """A copy of ``ctx`` with the recipe's passes ``names`` applied, from the plan as decided so
    far: the graph a later pass of the recipe runs on, so that it is calibrated on the
    activations the compiled model computes (a pass placed before TEAL changes them)."""
    from .pipeline import _copy_context, run_pipeline
    from .recipes import Recipe

    work = _copy_context(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compile of the whole recipe says what matched
        run_pipeline(work, Recipe(recipe.name, {n: recipe.passes[n] for n in names}), plan, registry=reg)
    return work


def calibrate_graph(ctx, recipe, example_inputs, plan: Plan | None = None, registry=None) -> Plan:
    """Calibrate on one captured graph and its example inputs (compile without a plan).

    Sites already in ``plan`` keep their entries; new ones are added. Greedy allocation needs
    the model, which a backend never sees, so it falls back to uniform (with a warning).
    """
    reg = registry or get_registry()
    plan = plan or Plan(recipe=recipe.to_dict(), meta=Plan.new_meta(calibrated_on="compile example inputs"))
    real = [_concrete(v) for v in example_inputs]
    order = order_passes(reg, recipe.passes)
    for i, name in enumerate(order):
        cfg, p = recipe.passes[name], reg.passes[name]
        if not needs_calibration(p, cfg):
            continue
        if isinstance(p, ModelCalibration):
            sites = [s for s in p.match(ctx, cfg) if s.key not in plan.sites]
            if sites:
                entries, tensors = p.calibrate_graph(ctx, sites, cfg, real)
                plan.add_entries(name, entries)
                plan.tensors.update(tensors)
            continue
        # probe the activations the compiled graph computes: the passes before this one applied
        before = [n for n in order[:i] if not isinstance(reg.passes[n], ModelCalibration)]
        work = with_passes(ctx, recipe, before, plan, reg) if before else ctx
        sites = [s for s in p.match(work, cfg) if s.key not in plan.sites]
        if not sites:
            continue
        collector = Collector(bins=getattr(cfg, "bins", 4096))
        added = insert_probes(work.gm, p.probes(work, sites, cfg), collector)
        try:
            with torch.no_grad(), collector:
                work.gm(*real)
        finally:
            remove_probes(work.gm, added)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller already warned that it calibrates here
            plan.add_entries(name, p.plan_entries(sites, cfg, collector.hists, None))
    return plan


def _concrete(v):
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        if hint is None:
            raise PlanError("cannot calibrate on symbolic shapes without hints: pass a plan from sparsec.calibrate")
        return int(hint)
    return v
