"""``torch.compile(model, backend="sparsec", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no ``import sparsec`` is
needed. The path (``shared/ALGORITHMS.md``): dynamo graph -> ATen graph (``make_fx``,
pre-dispatch) -> sparsec passes -> Inductor's ``compile_fx`` for everything dense.

After the passes, ``sparsec.codegen.lower`` swaps their ops for kernels that read prepared
(transposed) copies of the weights, made once here; the compiled callable re-copies a weight
that changes in place. Thresholds are constants of the compiled graph: a new plan needs a new
``torch.compile``.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from pathlib import Path

import torch

from .calibrate import calibrate_graph
from .capabilities import needs_calibration
from .errors import SparsecNotice
from .codegen import Pinned, RefreshingCallable, lower, weight_digest
from .capture import capture_dynamo
from .plan import Plan
from .pipeline import run_pipeline
from .plugins import get_registry
from .recipes import CompileOptions, resolve_recipe

__all__ = ["sparsec_backend", "SparsecNotice", "compiled_sites"]


class _CompileRecord:
    """What one torch.compile call (one options object) rewrote, over all its graphs: prefill
    and decode graphs, graphs on either side of a break, recompiles."""

    def __init__(self, options):
        self.options = options
        self.stamp = 0
        self.sites: dict[str, dict] = {}


#: weight tensor -> the record of the latest compile that captured it; lets
#: ``sparsec.report(compiled)`` find what the backend did without dynamo's private state
_RECORDS = torch.utils.weak.WeakIdKeyDictionary()
_stamps = itertools.count(1)


def _record(ctx, result, plan, recipe, options) -> None:
    tensors = list(ctx.tensors.values())
    rec = next((r for r in (_RECORDS.get(t) for t in tensors) if r is not None and r.options is options), None)
    rec = rec or _CompileRecord(options)
    rec.stamp = next(_stamps)
    for s in result.sites:
        entry = plan.sites.get(s.key)
        if entry is None:  # a pass that needs no plan (no calibration): what the site says
            cfg = recipe.passes.get(s.pass_name)
            entry = {"pass": s.pass_name, "kind": s.kind, "block": s.block, "weight_bytes": s.weight_bytes,
                     "weight_shapes": s.weight_shapes, "sparsity": float(getattr(cfg, "sparsity", 0.0) or 0.0)}
        rec.sites[s.key] = entry
    for t in tensors:
        _RECORDS[t] = rec


#: plans calibrated on the fly, so that recompiles (another shape) reuse the same thresholds:
#: {a weight of the model: {id(options): (options, plan, {weight name: weakref to the tensor
#: it was calibrated on})}}. Keyed weakly by the model's weight, so a plan lives as long as
#: the model or the compiled code (which holds the weights), not for the whole process.
_FALLBACK_PLANS = torch.utils.weak.WeakIdKeyDictionary()


def _fallback_key(ctx) -> torch.Tensor | None:
    return ctx.tensors[min(ctx.tensors)] if ctx.tensors else None


def _reusable(prev: Plan | None, seen: dict[str, weakref.ref], recipe, ctx) -> bool:
    """A plan calibrated on the fly earlier serves this graph only if it was made for the same
    recipe and every weight both graphs name is the same tensor: one options dict passed to
    two checkpoints of one architecture would otherwise run the first one's thresholds (and,
    for N:M, its compressed weights) on the second."""
    if prev is None or prev.recipe != recipe.to_dict():
        return False
    return all(seen[name]() is t for name, t in ctx.tensors.items() if name in seen)


def _dense(gm, example_inputs, opts: CompileOptions | None):
    if opts is not None and opts.dense_backend == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _notice(msg: str) -> None:
    warnings.warn(msg, SparsecNotice, stacklevel=3)


def compiled_sites(params) -> dict[str, dict]:
    """Every site the latest compile among ``params``' rewrote, in all of its graphs."""
    recs = [_RECORDS[p] for p in params if p in _RECORDS]
    return dict(max(recs, key=lambda r: r.stamp).sites) if recs else {}


def sparsec_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """The dynamo backend. ``options`` are described by ``sparsec.recipes.CompileOptions``."""
    raw = options if options is not None else {}
    opts = CompileOptions.from_dict({**raw, **kwargs})
    # validate everything the options name before any early return: a bad recipe or plan is an
    # error even for a graph that compiles densely (one that needs gradients, say)
    plan = opts.plan
    on_the_fly = plan is None
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    recipe = plan.recipe_obj() if plan is not None else resolve_recipe(opts.recipe)

    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        _notice("sparsec: this graph needs gradients (grad mode is on); compiled densely by Inductor. "
                "Run under torch.no_grad() or torch.inference_mode() for sparsity.")
        return _dense(gm, example_inputs, opts)

    ctx = capture_dynamo(gm, example_inputs)

    reg = get_registry()
    needs_cal = any(needs_calibration(reg.passes[n], c) for n, c in recipe.passes.items())
    if plan is None and needs_cal:
        key = _fallback_key(ctx)
        cache = _FALLBACK_PLANS.setdefault(key, {}) if key is not None else {}
        _, prev, seen = cache.get(id(raw), (None, None, {}))
        if not _reusable(prev, seen, recipe, ctx):
            prev, seen = None, {}
            _notice(f"sparsec: recipe {recipe.name!r} needs calibration and no plan was given: calibrating on "
                    "the compile example inputs (uniform allocation). For real use: "
                    "plan = sparsec.calibrate(model, batches, recipe); options={'plan': plan}.")
        plan = calibrate_graph(ctx, recipe, example_inputs, prev)
        seen = {**seen, **{name: weakref.ref(t) for name, t in ctx.tensors.items()}}
        cache[id(raw)] = (raw, plan, seen)  # keep raw alive so its id stays unique
    elif plan is None:
        plan = Plan(recipe=recipe.to_dict())

    result = run_pipeline(ctx, recipe, plan, on_plugin_error=opts.on_plugin_error)
    _record(ctx, result, plan, recipe, raw)  # also when nothing matched: the latest compile is what runs
    if not result.modified:
        if plan.sites:
            named = sorted(ctx.params.values())
            _notice(f"sparsec: none of the plan's {len(plan.sites)} sites (e.g. {next(iter(plan.sites))!r}) is in "
                    f"this graph, whose weights are named {named[:3] + ['...'] if len(named) > 3 else named}: "
                    "compiled as Inductor would. A plan names sites relative to the model it was calibrated on; "
                    "compile that model (or a function calling it).")
        else:
            _notice(f"sparsec: no pass matched this graph ({', '.join(result.unmatched) or 'none ran'} found no "
                    "site); compiled as Inductor would")
        return _dense(gm, example_inputs, opts)

    prepared = lower(ctx) if opts.kernels == "auto" else []
    pinned = [Pinned(fqn, ctx.tensors[fqn], weight_digest(ctx.tensors[fqn]), what)
              for fqn, what in ctx.pinned.items() if fqn in ctx.tensors]
    compiled = _dense(ctx.gm, example_inputs, opts)
    if prepared or pinned:
        # the weights of the model it is called with, or a PlanError (codegen.RefreshingCallable)
        phs = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"]
        positions = {ctx.params[n]: i for i, n in enumerate(phs) if n in ctx.params}
        compiled = RefreshingCallable(compiled, prepared, pinned, positions)
    if on_the_fly and needs_cal:
        return _PerWeights(compiled, gm, example_inputs)
    return compiled


class _PerWeights:
    """A graph calibrated on the fly runs sparse only on the weights it was calibrated on.

    torch.compile shares compiled code between instances of one module class (their weights
    are graph inputs), so a second checkpoint compiled with the same plan-less options would
    silently run the first one's thresholds and N:M weights. Other weights run the dense
    graph instead, with a notice (dynamo has already dropped what a second capture needs)."""

    def __init__(self, fn, gm, example_inputs):
        self.fn, self.gm = fn, gm
        self.pos = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
        self.refs = [weakref.ref(example_inputs[i]) for i in self.pos]
        self.warned = False

    def __call__(self, *args):
        if all(r() is args[i] for r, i in zip(self.refs, self.pos)):
            return self.fn(*args)
        if not self.warned:
            self.warned = True
            _notice("sparsec: torch.compile reused a graph that was calibrated on the fly for another model of "
                    "this class; this model runs it densely. Give each model its own plan "
                    "(sparsec.calibrate), or call torch._dynamo.reset() before compiling it.")
        return self.gm(*args)
