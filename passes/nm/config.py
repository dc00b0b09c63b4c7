"""The recipe section of the N:M weights pass (``passes.nm_weights``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparsec.errors import RecipeError

__all__ = ["NMWeightsConfig", "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")



@dataclass
class NMWeightsConfig:
    #: keep n of every m consecutive input weights of each output row
    n: int = 2
    m: int = 4
    #: mask scoring: "magnitude", "wanda" or "sparsegpt"
    method: str = "magnitude"
    #: "nm" (N:M groups, compressed, fast kernels) or "unstructured" (per-row top-k, masked dense)
    structure: str = "nm"
    #: unstructured only: the fraction of each row's weights removed, in [0, 1)
    sparsity: float = 0.5
    #: module-path patterns to rewrite (empty: every linear that fits)
    targets: list[str] = field(default_factory=list)
    #: module-path patterns never to rewrite
    ignore: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens", "embed", "wte", "wpe"])
    #: sparsegpt: columns per lazy-update block
    blocksize: int = 128
    #: sparsegpt: Hessian damping, as a fraction of mean(diag H)
    damp: float = 0.01
    #: CPU calls where a dense GEMM beats the N:M kernels (more than 16 tokens; bf16 from 5
    #: tokens on AMX CPUs) use a masked dense copy of the weight, made on the first such call:
    #: those run at dense speed, at the cost of the dense weight's memory once prefill has
    #: run. False: unpack blocks on the fly instead (no extra memory; prefill 0.5-1.0x dense)
    dense_copy: bool = True

    def validate(self) -> None:
        for k in ("n", "m", "blocksize"):
            if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool):
                raise RecipeError(f"{k} must be an integer, got {getattr(self, k)!r}")
        if self.structure not in ("nm", "unstructured"):
            raise RecipeError(f"structure must be 'nm' or 'unstructured', got {self.structure!r}")
        if self.structure == "nm":
            if self.n < 1 or self.m < 2:
                raise RecipeError(f"n must be >= 1 and m >= 2, got n={self.n}, m={self.m}")
            if self.n >= self.m:
                raise RecipeError(f"n must be smaller than m (keep n of every m), got n={self.n}, m={self.m}")
            if self.m > 256:
                raise RecipeError(f"m must be at most 256, got {self.m}")
        if self.method not in METHODS:
            from sparsec.errors import did_you_mean

            raise RecipeError(f"method must be one of {list(METHODS)}, got {self.method!r}{did_you_mean(str(self.method), METHODS)}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        # settings of the other structure would be ignored: say so (their defaults are harmless,
        # and a saved plan's recipe carries every default)
        if self.structure == "nm" and self.sparsity != 0.5:
            raise RecipeError(f"sparsity applies to structure 'unstructured'; with N:M, n and m set it "
                              f"(n={self.n}, m={self.m} removes {1 - self.n / self.m:.0%})")
        if self.structure == "unstructured" and (self.n, self.m) != (2, 4):
            raise RecipeError(f"n and m apply to structure 'nm'; unstructured pruning removes 'sparsity' "
                              f"({self.sparsity}) of each row")
        if self.blocksize < 1:
            raise RecipeError(f"blocksize must be positive, got {self.blocksize}")
        if not (self.damp >= 0):
            raise RecipeError(f"damp must not be negative, got {self.damp}")
        if not isinstance(self.dense_copy, bool):
            raise RecipeError(f"dense_copy must be true or false, got {self.dense_copy!r}")

    @property
    def removed(self) -> float:
        return 1 - self.n / self.m if self.structure == "nm" else self.sparsity
