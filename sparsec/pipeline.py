"""The sparsec pipeline: the whole compiler, top to bottom, in ``run_pipeline``."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from .errors import PassError, PluginError, SparsecError, SparsecNotice
from .passbase import GraphContext, Site
from .plugins import Registry, get_registry
from .recipes import check_on_plugin_error

__all__ = ["run_pipeline", "order_passes", "counters", "PipelineResult", "insert_probes", "Collector"]

#: Per-pass counters, ``counters[pass_name][what]`` (Inductor's style); tests read and clear them.
counters: defaultdict[str, Counter] = defaultdict(Counter)

_graph_ids = itertools.count()


@dataclass
class PipelineResult:
    modified: bool
    sites: list[Site] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    #: passes the recipe names that found no site in this graph
    unmatched: list[str] = field(default_factory=list)


def _copy_context(ctx: GraphContext) -> GraphContext:
    """A context over a copy of the graph (nodes and their meta copied; the module's tensors
    shared), for a pass whose failure must leave ``ctx`` untouched."""
    old = ctx.gm.graph
    graph = fx.Graph(tracer_cls=old._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    out, old_output = graph.graph_copy(old, env, return_output_node=True)  # node copies with shallow meta
    graph.output(out, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    graph._codegen = copy.deepcopy(old._codegen)  # export's pytree in/out specs
    gm = fx.GraphModule(ctx.gm, graph)
    return dataclasses.replace(ctx, gm=gm, params={env[n]: name for n, name in ctx.params.items() if n in env},
                               pinned=dict(ctx.pinned))


def _adopt(ctx: GraphContext, work: GraphContext) -> None:
    """Make ``ctx`` what the pass made of ``work``: its graph, the constants it added, its pins."""
    for name, value in list(work.gm.named_buffers(recurse=False)):
        if not hasattr(ctx.gm, name):
            ctx.gm.register_buffer(name, value)
    for name, value in list(work.gm.named_parameters(recurse=False)):
        if not hasattr(ctx.gm, name):
            ctx.gm.register_parameter(name, value)
    for name, value in list(work.gm.named_children()):
        if not hasattr(ctx.gm, name):
            ctx.gm.add_module(name, value)
    for name, value in vars(work.gm).items():  # plain tensor attributes (export's constants)
        if isinstance(value, torch.Tensor) and not hasattr(ctx.gm, name):
            setattr(ctx.gm, name, value)
    ctx.gm.graph = work.gm.graph
    ctx.params = work.params
    ctx.pinned = work.pinned


def order_passes(reg: Registry, names) -> list[str]:
    """Order the passes a recipe names by their ``after``/``before`` constraints (networkx).

    A constraint may name any registered pass (one not in the recipe is simply absent);
    an unknown name or a cycle is an error that names them.
    """
    g = nx.DiGraph()
    names = list(names)
    g.add_nodes_from(names)
    for name in names:
        p = reg.passes[name]
        for other in getattr(p, "after", ()) or ():
            if other not in reg.passes:
                raise PluginError(f"pass {name!r} (plugin {reg.pass_plugin[name]!r}) must run after {other!r}, which no plugin registers")
            if other in names:
                g.add_edge(other, name)
        for other in getattr(p, "before", ()) or ():
            if other not in reg.passes:
                raise PluginError(f"pass {name!r} (plugin {reg.pass_plugin[name]!r}) must run before {other!r}, which no plugin registers")
            if other in names:
                g.add_edge(name, other)
    # the state phase runs last: a pass that mutates a cache sees every other rewrite done
    state = [n for n in names if getattr(reg.passes[n], "phase", "rewrite") == "state"]
    for name in state:
        for other in names:
            if other not in state:
                if g.has_edge(name, other):
                    raise PluginError(f"pass {name!r} is a state pass (it mutates a cache) and runs last, but it "
                                      f"asks to run before {other!r}")
                g.add_edge(other, name)
    try:
        # lexicographic among unconstrained passes: the order never depends on dict order
        return list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        raise PluginError(f"pass ordering has a cycle: {path}") from None


def _mutated_args(node: fx.Node) -> list:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(node.args[i] if i < len(node.args) and not a.kwarg_only else node.kwargs.get(a.name))
    return out


def _check_mutations(ctx: GraphContext, name: str, phase: str, before: set) -> None:
    """The state contract (``passes/README.md``): only a ``phase = "state"`` pass may emit ops
    that mutate, and only graph inputs (a cache's static-address tensors), never a parameter."""
    for node in ctx.gm.graph.nodes:
        if node in before or node.op != "call_function":
            continue
        for arg in _mutated_args(node):
            what = f"pass {name!r} emitted {node.target} mutating {getattr(arg, 'name', arg)!r}"
            if phase != "state":
                raise PassError(f"{what}: only a state pass (phase = 'state') may mutate, and only a declared cache input")
            if not isinstance(arg, fx.Node) or arg.op != "placeholder":
                raise PassError(f"{what}, which is not a graph input: a state pass mutates only cache inputs")
            if arg in ctx.params:
                raise PassError(f"{what}, which is the model parameter {ctx.params[arg]!r}: passes never mutate weights")


def _debug_dir() -> Path | None:
    d = os.environ.get("SPARSEC_DEBUG")
    if not d:
        return None
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _dump(ddir: Path | None, gid: int, step: int, name: str, when: str, gm: fx.GraphModule) -> None:
    if ddir is not None:
        text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        (ddir / f"graph{gid:03d}_{step:02d}_{name}_{when}.txt").write_text(text)


def rewritten_count(graph: fx.Graph, sites: list) -> int:
    """How many of a pass's sites its rewrite changed: those with a matched node no longer in
    the graph (replaced or erased). Sites the pass left as they were (a layer the allocation
    kept dense) do not count; no pass has to report this itself."""
    alive = set(graph.nodes)
    return sum(1 for s in sites if any(isinstance(n, fx.Node) and n not in alive for n in s.nodes.values()))


def check_claims(sites_by_pass: dict[str, list], registry: Registry) -> None:
    """``PassError`` if two passes of a recipe claim one weight (their sites name the same
    parameter) and neither declares ``shares_weights_with`` the other: the later one would
    see the earlier one's op instead of the linear and skip it, or rewrite it wrongly."""
    owner: dict[str, str] = {}
    for name, sites in sites_by_pass.items():
        for s in sites:
            w = s.weights.get("weight") if isinstance(s.weights, dict) else None
            other = owner.get(w) if w else None
            if other is None or other == name:
                if w:
                    owner.setdefault(w, name)
                continue
            p, q = registry.passes[name], registry.passes[other]
            if other in getattr(p, "shares_weights_with", ()) or name in getattr(q, "shares_weights_with", ()):
                continue
            raise PassError(f"passes {other!r} and {name!r} both claim the linear {GraphContext.module_path(w)!r} "
                            f"(weight {w!r}); they do "
                            "not compose on one linear: give them disjoint targets/ignore")


def _claims(ctx: GraphContext, recipe, names: list[str], reg: Registry) -> dict[str, list]:
    """Match every pass of the recipe on the graph as captured, to ``check_claims``; returns
    what each matched there (nothing for a lone pass: there is nothing to check)."""
    if len(names) < 2:
        return {}
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each pass warns about its matches when it runs
        for name in names:
            try:
                found[name] = reg.passes[name].match(ctx, recipe.passes[name])
            except Exception:  # a pass that cannot match the raw graph says so when it runs
                found[name] = []
    check_claims(found, reg)
    return found


def run_pipeline(ctx: GraphContext, recipe, plan, *, on_plugin_error: str = "raise", registry: Registry | None = None) -> PipelineResult:
    """Run the recipe's passes, in dependency order, over one ATen graph, using the plan.

    Each pass matches its sites (without touching the graph), checks them against the plan,
    then rewrites. The graph is linted and recompiled once at the end.
    """
    check_on_plugin_error(on_plugin_error, "run_pipeline")
    reg = registry or get_registry()
    ddir, gid = _debug_dir(), next(_graph_ids)
    result = PipelineResult(modified=False)
    order = order_passes(reg, recipe.passes)
    on_capture = _claims(ctx, recipe, order, reg)
    for step, name in enumerate(order):
        p, cfg, plugin = reg.passes[name], recipe.passes[name], reg.pass_plugin[name]
        _dump(ddir, gid, step, name, "before", ctx.gm)
        # with "skip", the pass works on a copy that replaces the graph only if it succeeds: a
        # pass that rewrote some sites and then raised must leave no half-applied edit behind
        work = _copy_context(ctx) if on_plugin_error == "skip" else ctx
        before_nodes = set(work.gm.graph.nodes)
        try:
            sites = p.match(work, cfg)
            counters[name]["sites_matched"] += len(sites)
            changed = bool(p.rewrite(work, sites, cfg, plan)) if sites else False
            _check_mutations(work, name, getattr(p, "phase", "rewrite"), before_nodes)
        except SparsecError:
            raise  # already says what is wrong (a plan mismatch, say)
        except Exception as exc:
            before = f" after {result.ran}" if result.ran else " (the first pass)"
            msg = f"pass {name!r} from plugin {plugin!r} failed{before}: {type(exc).__name__}: {exc}"
            if on_plugin_error == "skip":
                warnings.warn(f"sparsec: skipping {msg}; the graph is as it was before this pass", stacklevel=2)
                counters[name]["skipped"] += 1
                continue
            raise PassError(msg) from exc
        if work is not ctx:
            _adopt(ctx, work)
        counters[name]["runs"] += 1
        if not sites:
            result.unmatched.append(name)
        if changed:
            counters[name]["sites_rewritten"] += rewritten_count(work.gm.graph, sites)
            result.sites.extend(sites)
        result.modified |= changed
        result.ran.append(name)
        _dump(ddir, gid, step, name, "after", ctx.gm)
    for name in result.unmatched if result.modified else ():  # else the caller says nothing matched
        # a pass the recipe names that does nothing must say so (a silently idle pass looks applied)
        ran = result.ran[: result.ran.index(name)]
        changed_by = [n for n in ran if any(s.pass_name == n for s in result.sites)]
        if name in on_capture and not on_capture[name]:
            changed_by = []  # it matched nothing on the graph as captured either
        why = (f"the passes before it ({', '.join(changed_by)}) rewrote sites it may have matched"
               if changed_by else "no call in it fits the pass's pattern and its targets/ignore")
        warnings.warn(f"sparsec: pass {name!r} matched no site in this graph: {why}", SparsecNotice, stacklevel=2)
    if result.modified:
        ctx.gm.graph.lint()
        ctx.gm.recompile()
    return result


# ---- calibration probes -------------------------------------------------------------------------


class Collector:
    """Histograms keyed by probe, fed by probe nodes while ``active``."""

    active: "Collector | None" = None

    def __init__(self, bins: int = 4096):
        from .histogram import Histogram

        self._H = Histogram
        self.bins = bins
        self.hists: dict[str, object] = {}
        self.signed: dict[str, bool] = {}

    def update(self, key: str, x: torch.Tensor) -> None:
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = self._H(signed=self.signed.get(key, True), bins=self.bins)
        h.update(x)

    def __enter__(self):
        Collector.active = self
        return self

    def __exit__(self, *exc):
        Collector.active = None


def _probe(x: torch.Tensor, key: str) -> None:
    c = Collector.active
    if c is not None and isinstance(x, torch.Tensor):
        c.update(key, x)


def insert_probes(gm: fx.GraphModule, probes: dict[str, tuple[fx.Node, bool]], collector: Collector) -> list[fx.Node]:
    """Insert a recording call after each probed node; returns the probe nodes (to remove later)."""
    added = []
    for key, (node, signed) in probes.items():
        collector.signed[key] = signed
        with gm.graph.inserting_after(node):
            added.append(gm.graph.call_function(_probe, (node, key)))
    gm.recompile()
    return added


def remove_probes(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    for n in nodes:
        gm.graph.erase_node(n)
    gm.recompile()
