"""``sparsec.export_onnx``: a sparse model as an ONNX file that runs in stock onnxruntime.

The pipeline is ``sparsec.export`` (torch.export + sparsec's passes), then
``torch.onnx.export(ep, dynamo=True, custom_translation_table=...)`` with the translation each
plugin registered for its ops (``sparsec_register_onnx_translations``), then
``onnx.checker.check_model(full_check=True)``.

N:M weights are written one of two ways (``nm_format``):

- ``"compressed"`` (default): the plan's values and packed positions, expanded to a dense
  weight by a few standard ops that onnxruntime constant-folds once at session load. The file
  is about ``n/m + bits/(8*itemsize)`` of the dense bytes per pruned weight.
- ``"dense"``: the masked weight, zeros included, as one ordinary initializer: the most
  portable choice (any runtime, any optimiser) at the dense file size.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError
from .export import export
from .export_program import densify, has_dense_forms
from .plan import Plan
from .plugins import get_registry

__all__ = ["export_onnx", "NM_FORMATS", "custom_ops"]

NM_FORMATS = ("compressed", "dense")
#: ONNX's protobuf limit is 2 GiB; above ~1.8 GiB of weights, write them as external data
_EXTERNAL_DATA_BYTES = int(1.8 * 2**30)


def custom_ops(ep: torch.export.ExportedProgram) -> list[torch._ops.OpOverload]:
    """The non-ATen ops a program calls (those that need a translation), in graph order."""
    seen: dict[str, torch._ops.OpOverload] = {}
    for node in ep.graph_module.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace not in ("aten", "prims"):
            seen.setdefault(t._name, t)
    return list(seen.values())


def _check_path(path: str | os.PathLike) -> Path:
    try:
        p = Path(path)
    except TypeError as exc:
        raise ExportError(f"export: the path must be a str or os.PathLike, got {type(path).__name__}") from exc
    if p.exists() and p.is_dir():
        raise ExportError(f"export: {str(p)!r} is a directory; give a file path such as {str(p / 'model.onnx')!r}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"export: cannot write {str(p)!r}: directory {str(parent)!r} does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise ExportError(f"export: cannot write {str(p)!r}: the file is read-only")
    try:  # permissions, read-only file systems, /proc ...: ask the file system itself
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ExportError(f"export: cannot write {str(p)!r}: directory {str(parent)!r} is not writable "
                          f"({exc.strerror or exc})") from exc
    return p


def _auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Batch and sequence axes dynamic: every axis of an integer tensor (token ids, positions),
    every axis but the last (the features) of a floating one."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise ExportError(f"export_onnx: the inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    spec: dict[str, Any] = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            axes = range(value.dim()) if not value.is_floating_point() else range(max(value.dim() - 1, 0))
            ones = [a for a in axes if value.shape[a] == 1]
            if ones:
                # torch.export specialises an axis whose example size is 1: the file would
                # silently have a fixed axis where the caller asked for a dynamic one
                raise ExportError(
                    f"export_onnx: input {name!r} has size 1 on axis {ones[0]} (shape {list(value.shape)}); "
                    "torch.export fixes size-1 axes, so it would not stay dynamic: give an example with at "
                    "least 2 rows and 2 tokens, or pass dynamic=False (fixed axes) or dynamic_shapes=...")
            spec[name] = {a: torch.export.Dim.AUTO for a in axes} or None
        else:
            spec[name] = None
    return spec


def _output_names(ep: torch.export.ExportedProgram) -> list[str] | None:
    """Readable output names from the program's output tree (``logits`` for a Hugging Face
    model rather than the name of the last node): unflatten placeholder leaves into the
    output structure, then read each leaf's key path."""
    import re

    from torch.utils import _pytree as pytree

    spec = ep.call_spec.out_spec
    if spec is None:
        return None
    try:
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # an output type that cannot be rebuilt from placeholders: keep torch's names
        return None
    names = [re.sub(r"[^0-9A-Za-z_]+", "_", pytree.keystr(p)).strip("_") or "output" for p in paths]
    if len(names) == 1 and names[0] in ("0", "output"):
        return ["output"]
    return [n if not n[0].isdigit() else f"output_{n}" for n in names]


def _optimize(program, keep_compressed: bool, keep_metadata: bool = False) -> None:
    """onnxscript's optimiser, as ``torch.onnx.export(optimize=True)`` runs it, except that
    compressed N:M positions are hidden from its constant folder: it would expand small
    layers' values + positions into dense (and int64) tensors inside the file, the opposite of
    compressed. They are graph inputs while it runs (not constants), initializers again after;
    onnxruntime folds the expansion when the session loads. (Turning folding off altogether
    instead made the optimiser's pattern rewriter take over 6 minutes on SmolLM2.)"""
    import onnxscript.optimizer

    model = program.model
    hidden = []
    if keep_compressed:
        import onnx_ir as ir

        for name, value in list(model.graph.initializers.items()):
            if value.const_value is not None and value.const_value.dtype == ir.DataType.UINT8:
                hidden.append((value, value.const_value))
                del model.graph.initializers[name]
                value.const_value = None
                model.graph.inputs.append(value)
    model = onnxscript.optimizer.optimize(model)
    for value, tensor in hidden:
        model.graph.inputs.remove(value)
        value.const_value = tensor
        model.graph.register_initializer(value)
    if not keep_metadata:
        # torch.onnx records each node's Python stack trace and module path: most of a small
        # model's file, and absolute paths of the exporting machine in a deployable artefact
        for node in model.graph.all_nodes():
            node.metadata_props.clear()
    program.model = model


def _translation_table(ep: torch.export.ExportedProgram) -> dict:
    reg = get_registry()
    translations = reg.onnx_translations()
    table = {}
    for op in custom_ops(ep):
        info = translations.get(op._name)
        if info is None:
            owner = reg.kernels[op._name].plugin if op._name in reg.kernels else None
            who = f"plugin {owner!r}" if owner else "no loaded plugin (it registered no kernel for it)"
            raise ExportError(
                f"export_onnx: op {op._name!r} has no ONNX translation; it is owned by {who}. "
                "Register one with the sparsec_register_onnx_translations hook."
            )
        table[op] = info.fn
    return table


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    path: str | os.PathLike,
    kwargs: dict | None = None,
    *,
    plan: Plan | str | Path | None = None,
    recipe: Any = None,
    nm_format: str = "compressed",
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    external_data: bool | None = None,
    opset: int = 18,
    check: bool = True,
    keep_metadata: bool = False,
    progress: bool = True,
    on_plugin_error: str = "raise",
) -> Path:
    """Write ``model`` with the plan's rewrites to ``path`` as ONNX; returns the path.

    ``dynamic=True`` makes the batch and sequence axes of the inputs dynamic (give example
    inputs with at least 2 rows and 2 tokens: torch.export treats size-1 axes as static, so
    an example with a size-1 axis there is refused with an ``ExportError``); ``args`` may be
    a bare tensor (one positional input);
    ``dynamic_shapes`` overrides it with torch.export's own spec. ``external_data=None``
    writes the weights beside the file (``<path>.data``) only when they exceed ~1.8 GiB.
    ``keep_metadata`` keeps torch.onnx's per-node stack traces and module paths (dropped by
    default: they are most of a small file and name paths of the exporting machine).
    The model itself is not modified.
    """
    from tqdm.auto import tqdm

    if nm_format not in NM_FORMATS:
        raise ExportError(f"export_onnx: nm_format must be one of {NM_FORMATS}, got {nm_format!r}")
    path = _check_path(path)
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = _auto_dynamic_shapes(model, args, kwargs)
        if not kwargs:  # torch.export wants a tuple spec when every input is positional
            dynamic_shapes = tuple(dynamic_shapes.values())

    steps = tqdm(total=3 + check, desc="sparsec export-onnx", unit="step", disable=not progress)
    steps.set_postfix_str("torch.export + sparsec passes")
    ep = export(model, args, kwargs or None, plan=plan, recipe=recipe, dynamic_shapes=dynamic_shapes,
                on_plugin_error=on_plugin_error)
    if nm_format == "dense":
        densify(ep)  # every op with a registered dense form (N:M: the masked dense weight)
    table = _translation_table(ep)
    steps.update()

    if external_data is None:
        weights = list(ep.state_dict.values()) + list(ep.constants.values())
        external_data = sum(t.numel() * t.element_size() for t in weights if isinstance(t, torch.Tensor)) > _EXTERNAL_DATA_BYTES
    steps.set_postfix_str("translate to ONNX")
    with warnings.catch_warnings():
        # torch.onnx warns that torchvision's ops are not registered; irrelevant here
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        program = torch.onnx.export(ep, args, kwargs=kwargs or None, dynamo=True, custom_translation_table=table,
                                    opset_version=opset, verbose=False, optimize=False,
                                    output_names=_output_names(ep))
    _optimize(program, keep_compressed=nm_format == "compressed" and has_dense_forms(ep), keep_metadata=keep_metadata)
    program.save(str(path), external_data=external_data)
    steps.update()
    if check:
        import onnx

        steps.set_postfix_str("onnx.checker (full)")
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ExportError(f"export_onnx: {str(path)!r} fails onnx.checker: {exc}") from exc
        steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return path
