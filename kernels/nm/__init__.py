"""The N:M weight kernels: ``ops`` (packing, schemas, references, dispatch; the semi-structured
route on CUDA), ``csrc/`` (the C++ kernels), ``onnx`` (translation)."""

from . import ops
from .ops import *  # noqa: F401,F403  (the family's op API)

# sparsec.kernels.nm was one module before the family became a folder; older code and the
# tests reach its private helpers too (``_cats_cpu``, ``_DENSE``...): keep every name of ``ops``
globals().update({k: v for k, v in vars(ops).items() if not k.startswith("__")})
