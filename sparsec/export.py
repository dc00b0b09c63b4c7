"""``sparsec.export``: a ``torch.export.ExportedProgram`` with sparsec's ops in it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .backend import SparsecNotice
from .calibrate import ArgsKwargs, calibrate
from .capabilities import needs_calibration
from .capture import capture_export
from .errors import RecipeError
from .plan import Plan
from .pipeline import run_pipeline
from .plugins import get_registry
from .recipes import check_on_plugin_error, resolve_recipe

__all__ = ["export"]


def export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    plan: Plan | str | Path | None = None,
    recipe: Any = None,
    dynamic_shapes: Any = None,
    on_plugin_error: str = "raise",
) -> torch.export.ExportedProgram:
    """Export ``model`` with the plan's rewrites applied; ``ep.module()`` runs it.

    ``args`` is a tuple of positional inputs, or a bare tensor for one (as for
    ``export_onnx``). Give a calibrated ``plan`` (or a ``recipe``: one that needs calibration
    is calibrated on ``args``, with a warning). The model itself is not modified.
    """
    # a bare tensor is one input (torch.export would unpack its rows as many positional ones)
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if plan is None and recipe is None:
        raise ValueError("sparsec.export: give a plan (sparsec.calibrate) or a recipe")
    if plan is not None and recipe is not None:
        raise RecipeError("sparsec.export: give a plan or a recipe, not both (a plan carries its recipe)")
    check_on_plugin_error(on_plugin_error, "sparsec.export")  # before any calibration
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    if plan is None:
        recipe_obj = resolve_recipe(recipe)
        reg = get_registry()
        if any(needs_calibration(reg.passes[n], c) for n, c in recipe_obj.passes.items()):
            warnings.warn(f"sparsec.export: recipe {recipe_obj.name!r} needs calibration and no plan was given: "
                          "calibrating on the export inputs", SparsecNotice, stacklevel=2)
            plan = calibrate(model, [ArgsKwargs(tuple(args), dict(kwargs or {}))], recipe_obj, progress=False)
        else:
            plan = Plan(recipe=recipe_obj.to_dict())
    recipe_obj = plan.recipe_obj()
    ep, ctx = capture_export(model, args, kwargs, dynamic_shapes)
    with torch.no_grad():
        result = run_pipeline(ctx, recipe_obj, plan, on_plugin_error=on_plugin_error)
    if not result.modified:
        warnings.warn("sparsec.export: no pass matched; the program is the dense export", SparsecNotice, stacklevel=2)
    _lift_constants(ep)
    return ep


def _lift_constants(ep: torch.export.ExportedProgram) -> None:
    """Tensors a pass added as ``get_attr`` constants (a plan's compressed weights) become
    lifted constant inputs of the program, as torch.export itself does with tensor constants,
    so the program is self-contained (``ep.constants``, ``torch.export.save``)."""
    gm = ep.graph_module
    if not any(n.op == "get_attr" and n.target.startswith("_sparsec_") for n in gm.graph.nodes):
        return
    from torch._export.passes.lift_constants_pass import ConstantAttrMap, lift_constants_pass

    lifted = lift_constants_pass(gm, ep.graph_signature, ConstantAttrMap())
    ep._constants.update(lifted)
    for name in list(lifted):
        if hasattr(gm, name):
            delattr(gm, name)
    gm.recompile()
