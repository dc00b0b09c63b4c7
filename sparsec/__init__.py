"""sparsec: a plugin-based sparsity compiler for PyTorch.

    compiled = torch.compile(model, backend="sparsec", options={"recipe": "teal-40"})
    plan = sparsec.calibrate(model, batches, recipe="teal-50"); plan.save("m.sparsec")
    ep = sparsec.export(model, (input_ids,), plan=plan)
    sparsec.export_onnx(model, (input_ids,), "m.onnx", plan=plan)
    mlir_module = sparsec.export_mlir(model, (input_ids,), plan=plan)
    print(sparsec.report(compiled))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backend import SparsecNotice, sparsec_backend
from .calibrate import calibrate
from .errors import ExportError, PassError, PlanError, PluginError, RecipeError, SparsecError
from .export import export
from .mlir_export import export_mlir
from .onnx_export import export_onnx
from .hookspecs import hookimpl
from .passbase import GraphContext, Pass, Site
from .pipeline import counters, run_pipeline
from .plan import Plan
from .plugins import get_registry
from .recipes import Recipe, resolve_recipe
from .report import Report, report

__all__ = [
    "__version__",
    "calibrate",
    "export",
    "export_onnx",
    "export_mlir",
    "report",
    "Report",
    "Plan",
    "Recipe",
    "resolve_recipe",
    "Pass",
    "Site",
    "GraphContext",
    "hookimpl",
    "counters",
    "run_pipeline",
    "get_registry",
    "sparsec_backend",
    "SparsecNotice",
    "SparsecError",
    "RecipeError",
    "PlanError",
    "PluginError",
    "PassError",
    "ExportError",
]
