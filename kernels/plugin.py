"""Deprecated: the built-in kernels are registered by their families' plugin modules now
(``sparsec.passes.activation``, ``sparsec.passes.nm``: kernels, ONNX translations, MLIR
decompositions). This module registers nothing and stays importable for older code."""
