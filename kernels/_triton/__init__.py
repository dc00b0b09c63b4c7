"""Shared machinery of sparsec's generated Triton kernels (CUDA tensors). Names no method family.

sparsec's codegen renders one kernel module per *site specification* (:class:`SiteSpec`: op,
dtype, the weight's shape, which epilogues are fused, and whatever else a family's spec adds)
from templates, with the shape and dtype written into the source as literals, so each
rewritten site gets a kernel specialised for it. The templates live with their family, in
``kernels/<family>/triton.py``, which registers each op it generates kernels for
(:func:`register` a :class:`TritonOp`: how to render the op's kernels, which of them to
compile ahead of time, and its ``triton_op`` twin) when it is imported. This package has the
rest:

- ``spec``: :class:`SiteSpec`, :class:`TritonOp` and the registry; ``available()``, the
  interpreter / architecture probes;
- ``source``: the shared header and fused ``epilogue`` template (``y = cast(acc + bias +
  residual)``), the helpers templates use (``autotune_configs``, ``dot``, dtype tables), and
  :func:`generate`: render, write to ``$SPARSEC_CACHE/triton/`` atomically, import;
- ``runtime``: :func:`launch` (``wrap_triton``), ``triton_cdiv``, ``run_epilogue``;
- ``aot``: :func:`aot_compile`, every kernel of a site in every autotune configuration to
  cubins for a ``GPUTarget``;
- ``graph``: :func:`use_triton_ops`, the swap of prepared ops on CUDA nodes for their twins.

Autotune configurations are per architecture (each family's tables); under
``TRITON_INTERPRET=1`` one small configuration is used (the interpreter runs every program in
numpy). CI checks every kernel two ways without a GPU: in the interpreter against the
reference, and compiled ahead of time to cubins for sm_80 and sm_90 (:func:`aot_compile`).
"""

import os as _os

# Triton 3.9 warns on every import until this is set; 1 keeps its (and CUDA's) default.
_os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from .aot import aot_compile, aot_configs, epilogue_aot  # noqa: E402
from .graph import use_triton_ops  # noqa: E402
from .runtime import EPILOGUE_BLOCK, launch, run_epilogue, small_batch, triton_cdiv  # noqa: E402
from .source import (  # noqa: E402
    EPILOGUE, HEADER, PTR, TL_DTYPE, autotune_configs, dot, epilogue_source, generate, render,
)
from .spec import (  # noqa: E402
    MAX_BATCH, SiteSpec, TritonOp, available, current_arch, register, registered, registered_ops,
)

__all__ = [
    "MAX_BATCH", "SiteSpec", "TritonOp", "register", "registered", "registered_ops", "available", "current_arch",
    "TL_DTYPE", "PTR", "HEADER", "EPILOGUE", "autotune_configs", "dot", "epilogue_source", "render", "generate",
    "launch", "triton_cdiv", "EPILOGUE_BLOCK", "run_epilogue", "small_batch",
    "aot_configs", "epilogue_aot", "aot_compile", "use_triton_ops",
]
