"""The hooks a sparsec plugin may implement.

Every hook has the ``register(...)`` form (as in the llm project): sparsec passes a callback,
so it can validate what a plugin registers, reject duplicate names with both owners named,
and remember which plugin owns each thing. Hooks only ever gain parameters; an
implementation may accept any subset of them (pluggy's rule).

A plugin is a module or an object with functions decorated by ``sparsec.hookimpl``, listed
under the entry-point group ``sparsec`` of its distribution::

    [project.entry-points.sparsec]
    my_plugin = "my_package.sparsec_plugin"
"""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "SparsecSpec"]

hookspec = pluggy.HookspecMarker("sparsec")
hookimpl = pluggy.HookimplMarker("sparsec")


class SparsecSpec:
    @hookspec
    def sparsec_register_passes(self, register):
        """Register graph passes: call ``register(pass_instance)`` for each.

        A pass is an object with ``name``, ``config_cls``, ``match(ctx, config)`` and
        ``rewrite(ctx, matches, config, plan)``; see ``sparsec.Pass``. Names are global:
        a second pass with a taken name is an error naming both plugins.
        """

    @hookspec
    def sparsec_register_kernels(self, register):
        """Register the custom ops a plugin's passes emit:
        ``register(op, reference=fn, description="...")``.

        ``op`` is a ``torch.library`` op (``torch.ops.ns.name``); ``reference`` is its plain
        torch implementation that faster kernels are tested against. Registration records
        which plugin owns the op, so later errors (a missing ONNX translation, say) can name it.
        """

    @hookspec
    def sparsec_register_onnx_translations(self, register):
        """Register how each custom op lowers to standard ONNX: ``register(op, fn)``.

        ``fn`` is an onnxscript function with the op's schema (tensors as values, scalars as
        Python attributes) written with ``onnxscript.opset18`` ops; ``torch.onnx.export``
        calls it through its ``custom_translation_table``. Called only when exporting to
        ONNX, so plugins import onnxscript inside the hook, never at import time.
        """

    @hookspec
    def sparsec_register_recipes(self, register):
        """Register named recipes: ``register(name, recipe_dict, description="...")``."""

    @hookspec
    def sparsec_register_lowerings(self, register):
        """Register how each custom op is lowered when compiling: ``register(op, Lowering(...))``.

        ``sparsec.codegen.Lowering(prepare=fn(lctx, nodes), epilogue="residual", triton=fn(gm))``:
        ``prepare`` rewrites the op's nodes into what runs (prepared weight copies from
        ``lctx.transposed``, fused groups, the kernel op); ``epilogue`` names a residual argument
        the op adds in place, so core folds ``residual + op(...)`` into it; ``triton`` swaps the
        op's CUDA nodes for ``triton_op`` twins. Ops without a lowering run as the passes emit
        them. One lowering per op: a second is an error naming both plugins.
        """

    @hookspec
    def sparsec_register_decompositions(self, register):
        """Register the ATen decomposition of each custom op for MLIR export: ``register(op, fn)``.

        ``fn`` takes the op's arguments and computes its result with ATen ops only (the
        plain-torch reference usually is one); ``sparsec.export_mlir`` runs it through
        ``ExportedProgram.run_decompositions`` before torch-mlir imports the program. Called
        only when exporting to MLIR. Exporting a graph with an op that has no decomposition is
        an ``ExportError`` naming the op.
        """

    @hookspec
    def sparsec_register_dense_forms(self, register):
        """Register how an op whose weights the plan holds in a compressed form is written with
        a plain dense weight, for exports that need one: ``register(op, fn)``.

        ``fn(node, tensor_of)`` gets the op's call node and ``tensor_of(arg)`` (the program's
        constant behind an argument) and returns ``DenseForm(weight, build, encoding)``
        (``sparsec.export_program``): the dense weight, ``build(graph, weight_node)`` making the
        replacement call, and the MLIR sparse encoding of the weight (or ``None``). Used by
        ``export_onnx(nm_format="dense")`` and by ``export_mlir`` (which gives each weight its
        encoding).
        """

