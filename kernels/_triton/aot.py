"""Ahead-of-time compilation of generated kernels to cubins for a ``GPUTarget``: CI checks
every kernel of a site, in every autotune configuration, for real GPUs without one (Triton
ships ptxas)."""

from __future__ import annotations

import os

from .runtime import EPILOGUE_BLOCK
from .source import _MODULES, PTR, generate
from .spec import SiteSpec, registered

__all__ = ["aot_configs", "epilogue_aot", "aot_compile"]


def aot_configs(table: dict, names: tuple[str, str], arch, **constexprs) -> list[tuple[dict, int, int]]:
    """``[(constexprs, num_warps, num_stages), ...]`` for each row of an autotune ``table[arch]``
    (the rows ``autotune_configs`` renders), with the kernel's fixed ``constexprs`` added."""
    return [({**constexprs, names[0]: a, names[1]: b}, w, s) for a, b, w, s in table[arch]]


def epilogue_aot(spec: SiteSpec) -> tuple[dict[str, str], list[tuple[dict, int, int]]]:
    """The shared ``epilogue`` kernel's signature and its one configuration."""
    p = PTR[spec.dtype]
    sig = {"ACC": "*fp32", "BIAS": p, "RES": p, "Y": p, "total": "i32", "BLOCK": "constexpr"}
    return sig, [({"BLOCK": EPILOGUE_BLOCK}, 4, 1)]


def aot_compile(spec: SiteSpec, capability: int) -> dict[str, list[bytes]]:
    """Compile every kernel of ``spec`` in every autotune configuration for ``sm_<capability>``.

    Returns ``{kernel: [cubin, ...]}``. Needs no GPU (Triton ships ptxas).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = 9 if capability >= 90 else 8
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the AST must be a real JIT function
    try:
        _MODULES.pop((spec, arch, False), None)
        mod = generate(spec, arch)
        out: dict[str, list[bytes]] = {}
        target = GPUTarget("cuda", capability, 32)
        for kname, (sig, cfgs) in registered(spec.op).aot(spec, arch).items():
            obj = getattr(mod, kname)
            fn = obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj  # unwrap the autotuner
            out[kname] = []
            for consts, warps, stages in cfgs:
                src = ASTSource(fn=fn, signature=sig, constexprs=dict(consts))
                k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                out[kname].append(k.asm["cubin"])
        return out
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
