"""``sparsec.export_mlir``: the sparse model as MLIR (linalg on tensors) through torch-mlir.

    module = sparsec.export_mlir(model, (x,), plan=plan)      # a torch_mlir.ir.Module
    text = str(module)                                         # or: sparsec export-mlir --out m.mlir

The route (ALGORITHMS.md): ``sparsec.export`` (torch.export + sparsec's passes); every sparsec
op is decomposed into ATen by its plain-torch reference, so activation thresholds become
ordinary elementwise ops (``abs``, compare, ``select``); each N:M op becomes a linear on its
masked dense weight; ``torch_mlir.fx.export_and_import(output_type="linalg-on-tensors")``;
then each N:M weight is given its sparse type. The matmul that reads it is rewritten to
read the weight directly (no transpose) through
``sparse_tensor.convert %w : tensor<OxIxf32> to tensor<OxIxf32, #NM>`` with::

    #NM = #sparse_tensor.encoding<{ map = (i, j) -> (i : dense, j floordiv M : dense,
                                                     j mod M : structured[N, M]) }>

MLIR's ``sparsifier`` pipeline (``enable-runtime-library=false``) compiles such a module and
the ExecutionEngine bundled with the torch-mlir wheel runs it (``run_sparsified``), with no
runtime libraries. The text holds every weight (as hex resources), about twice the weight
bytes: meant for small models and single layers, not for a 1 GB checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sparsec.kernels._common import linear_as_mm

from .errors import ExportError
from .export import export
from .plan import Plan

__all__ = ["export_mlir", "nm_encoding", "run_sparsified", "linear_as_mm"]


def nm_encoding(n: int, m: int) -> str:
    return (f"#sparse_tensor.encoding<{{ map = (i, j) -> (i : dense, j floordiv {m} : dense, "
            f"j mod {m} : structured[{n}, {m}]) }}>")


def _decompositions() -> dict:
    """torch-mlir's table, ``aten.linear`` as one matmul, and every plugin op's decomposition
    (``sparsec_register_decompositions``)."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    from .plugins import get_registry

    table = {**get_decomposition_table(), torch.ops.aten.linear.default: linear_as_mm}
    table.update({info.op: info.fn for info in get_registry().decompositions().values()})
    return table


def _resource_hex(t: torch.Tensor) -> str:
    # MLIR's blob syntax: a 4-byte little-endian alignment word, then the raw bytes
    return "0x04000000" + t.detach().contiguous().cpu().numpy().tobytes().hex().upper()


def _encode_weights(text: str, weights: list[tuple[torch.Tensor, str]]) -> tuple[str, int]:
    """Give each weight its sparse type (the encoding its op's dense form registered: N:M's
    ``structured[N, M]``) in the linalg text; returns (text, count)."""
    resources = dict(re.findall(r"^\s+(torch_tensor_[\w.]+): \"(0x[0-9A-F]+)\"", text, flags=re.M))
    encodings: dict[str, str] = {}
    lines = text.split("\n")
    rewritten = 0
    aliases: dict[str, str] = {}
    for w, encoding in weights:
        out_f, in_f = w.shape
        blob = _resource_hex(w)
        keys = [k for k, v in resources.items() if v == blob]
        if not keys:
            raise ExportError(f"export_mlir: lost track of a sparse weight [{out_f}, {in_f}] in the imported module")
        alias = aliases.setdefault(encoding, f"#SP_{len(aliases)}")
        encodings[alias] = encoding
        dense_t = f"tensor<{out_f}x{in_f}xf32>"
        sparse_t = f"tensor<{out_f}x{in_f}xf32, {alias}>"
        for key in keys:
            consts = re.findall(rf"(%[\w.]+) = arith\.constant dense_resource<{re.escape(key)}> : ", text)
            for c in consts:
                trans = re.findall(rf"(%[\w.]+) = linalg\.transpose ins\({re.escape(c)} : {re.escape(dense_t)}\) "
                                   r"outs\([^)]*\) permutation = \[1, 0\]", text)
                for t in trans:
                    pat = re.compile(rf"^(\s*)(%[\w.]+) = linalg\.matmul ins\((%[\w.]+), {re.escape(t)} : "
                                     rf"tensor<(\d+)x{in_f}xf32>, tensor<{in_f}x{out_f}xf32>\) "
                                     rf"outs\((%[\w.]+) : tensor<\d+x{out_f}xf32>\) -> (tensor<\d+x{out_f}xf32>)$")
                    for i, line in enumerate(lines):
                        mt = pat.match(line)
                        if not mt:
                            continue
                        ind, res, xv, rows, acc, res_t = mt.groups()
                        sv, xb = f"{c}_nm{rewritten}", f"%nm_x{rewritten}"
                        x_t = f"tensor<{rows}x{in_f}xf32>"
                        lines[i] = "\n".join([
                            f"{ind}{sv} = sparse_tensor.convert {c} : {dense_t} to {sparse_t}",
                            # A barrier: when an elementwise op (a ReLU, a threshold) produces x,
                            # the sparsifier fuses it into the sparse matmul and then fails to
                            # lower ("unresolved source materialization" of the storage
                            # specifier, torch-mlir 20261001). Materialising x first avoids it.
                            f"{ind}{xb}_dst = tensor.empty() : {x_t}",
                            f"{ind}{xb} = bufferization.materialize_in_destination {xv} in {xb}_dst : "
                            f"({x_t}, {x_t}) -> {x_t}",
                            f"{ind}{res} = linalg.generic {{indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d2)>, "
                            f"affine_map<(d0, d1, d2) -> (d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d1)>], "
                            f"iterator_types = [\"parallel\", \"parallel\", \"reduction\"]}} "
                            f"ins({xb}, {sv} : {x_t}, {sparse_t}) outs({acc} : {res_t}) {{",
                            f"{ind}^bb0(%nm_x: f32, %nm_w: f32, %nm_acc: f32):",
                            f"{ind}  %nm_p = arith.mulf %nm_x, %nm_w : f32",
                            f"{ind}  %nm_s = arith.addf %nm_acc, %nm_p : f32",
                            f"{ind}  linalg.yield %nm_s : f32",
                            f"{ind}}} -> {res_t}",
                        ])
                        rewritten += 1
    header = "".join(f"{a} = {e}\n" for a, e in sorted(encodings.items()))
    return header + "\n".join(lines), rewritten


def export_mlir(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    plan: Plan | str | Path | None = None,
    recipe: Any = None,
    path: str | Path | None = None,
    on_plugin_error: str = "raise",
):
    """The model with the plan's rewrites as a torch-mlir ``Module`` (linalg on tensors).

    N:M weights (fp32) carry ``#sparse_tensor.encoding`` with ``structured[N, M]`` levels;
    activation thresholds are elementwise ops. ``path`` also writes the textual IR. Shapes are
    the example's (static). The model itself is not modified.
    """
    try:
        from torch_mlir import fx, ir
    except ImportError as exc:  # pragma: no cover - torch-mlir is a dependency on Linux x86-64
        raise ExportError("export_mlir needs torch-mlir (pip install torch-mlir)") from exc
    from .export_program import densify
    from .onnx_export import _check_path, custom_ops

    if path is not None:
        path = _check_path(path)
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    ep = export(model, args, kwargs, plan=plan, recipe=recipe, on_plugin_error=on_plugin_error)
    weights = [(w, enc) for w, enc in densify(ep) if enc is not None]  # ops with a dense form: N:M
    for w, _ in weights:
        if w.dtype != torch.float32:
            raise ExportError(f"export_mlir: weights with a sparse encoding must be float32, got {w.dtype}")
    table = _decompositions()
    unknown = [op._name for op in custom_ops(ep) if op not in table]
    if unknown:
        raise ExportError(f"export_mlir: no ATen decomposition for op(s) {', '.join(unknown)}")
    ep = ep.run_decompositions(table)
    # torch-mlir's frozen import looks every buffer up in state_dict, but torch.export keeps
    # non-persistent ones (rotary inv_freq) in constants; give the importer a program that has them
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "BUFFER" and spec.target not in ep.state_dict and spec.target in ep.constants:
            ep._state_dict[spec.target] = ep.constants[spec.target]
    module = fx.export_and_import(ep, output_type="linalg-on-tensors", func_name="main", decomposition_table={})
    text = str(module)
    if weights:
        text, count = _encode_weights(text, weights)
        if count < len(weights):
            raise ExportError(f"export_mlir: gave a sparse encoding to {count} of {len(weights)} sparse linears")
        module = ir.Module.parse(text, context=module.context)
    if path is not None:
        path.write_text(str(module))
    return module


def run_sparsified(module, *inputs: torch.Tensor, func: str = "main") -> torch.Tensor:
    """Compile ``module`` with MLIR's ``sparsifier`` (``enable-runtime-library=false``) and run
    it on the ExecutionEngine in the torch-mlir wheel; one tensor result. For tests and checks:
    the module is parsed afresh, so ``module`` itself is not changed."""
    import ctypes

    import numpy as np
    from torch_mlir import ir
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import np_to_memref as npm

    text = str(module)
    # the C interface lets the engine pass memref descriptors by pointer
    text = re.sub(rf"(func\.func @{func}\([^{{]*?\)(?: -> [^{{]*?)?) \{{", r"\1 attributes {llvm.emit_c_interface} {",
                  text, count=1)
    with ir.Context():
        mod = ir.Module.parse(text)
        PassManager.parse("builtin.module(sparsifier{enable-runtime-library=false})").run(mod.operation)
        engine = ExecutionEngine(mod, opt_level=2)
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy()) for t in inputs]
        out = npm.make_nd_memref_descriptor(len(_result_shape(text, func)), npm.as_ctype(np.float32))()
        ptrs = [ctypes.pointer(ctypes.pointer(out))]
        ptrs += [ctypes.pointer(ctypes.pointer(npm.get_ranked_memref_descriptor(a))) for a in arrays]
        engine.invoke(func, *ptrs)
        return torch.from_numpy(npm.ranked_memref_to_numpy(ctypes.pointer(out)).copy())


def _result_shape(text: str, func: str) -> list[int]:
    mt = re.search(rf"func\.func @{func}\(.*?\) -> tensor<([0-9x]+)xf32>", text)
    if not mt:
        raise ExportError(f"run_sparsified: @{func} must return one static f32 tensor")
    return [int(d) for d in mt.group(1).split("x")]
