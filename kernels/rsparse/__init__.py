"""The R-Sparse kernels: ``ops`` (schemas, fakes, plain-torch references, dispatch to C++ on
CPU and generated Triton on CUDA), ``csrc/`` (the C++ kernel), ``triton`` (the Triton
templates, imported on the first CUDA call), ``onnx`` (translation) and ``mlir`` (ATen
decomposition)."""

from . import ops
from .ops import *  # noqa: F401,F403  (the family's op API)
