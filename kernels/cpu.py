"""Build and load sparsec's C++ CPU kernels (``kernels/csrc/*.cpp``, one extension).

Built once with ``torch.utils.cpp_extension`` and cached on disk outside the repository, in
``$SPARSEC_CACHE/ext`` (default ``~/.cache/sparsec/ext``). The cache key hashes the source,
the compiler's version, the flags and the torch/python versions, so a change to any of them
builds anew and stale builds are never loaded. A file lock makes two processes that build at
the same time wait for one another (the second loads what the first built). The first build
is logged (about 35-40 s on the 2-core dev machine); later loads import the shared object
directly, without ninja (about 0.1 s).

The instruction set is chosen at build time from what torch reports for this CPU
(``torch.backends.cpu.get_cpu_capability()``): AVX-512 (f/bw/vl), AVX2+FMA, or a portable
build that the compiler auto-vectorises (Arm, old x86). ``SPARSEC_CPU_ISA=avx512|avx2|portable``
overrides it (the tests build all three).

If no compiler is available the build fails once, a warning says so, and the ops fall back to
their plain-torch references (correct, not fast).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import math
import mmap
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["extension", "loaded", "isa", "cache_dir", "build_info", "ISA_FLAGS", "empty_huge"]

log = logging.getLogger("sparsec.kernels")

SOURCES = [Path(__file__).parent / "csrc" / f for f in ("activation_sparse.cpp", "nm_sparse.cpp")]

#: compiler flags per instruction set. No -ffast-math: NaN must propagate as in the reference.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}
BASE_FLAGS = ["-O3", "-fopenmp", "-std=c++17"]

_loaded: dict[str, ModuleType | None] = {}
_info: dict[str, dict] = {}
_registered: list[str] = []


def version_of(t: torch.Tensor) -> int:
    """``t._version``; -1 for inference tensors, which keep no version counter (reading it
    raises). They change only inside ``torch.inference_mode``, where a weight update is not
    seen: a model built there runs on the copies made at compile time."""
    return -1 if t.is_inference() else t._version


def isa() -> str:
    """The instruction set the kernels are built for on this machine."""
    env = os.environ.get("SPARSEC_CPU_ISA")
    if env:
        if env not in ISA_FLAGS:
            raise ValueError(f"SPARSEC_CPU_ISA={env!r}: expected one of {sorted(ISA_FLAGS)}")
        return env
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "portable"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "avx512"
    if cap.startswith("AVX2"):
        return "avx2"
    return "portable"


def cache_dir() -> Path:
    root = os.environ.get("SPARSEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsec")
    return Path(root) / "ext"


def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _key(which: str) -> tuple[str, list[str]]:
    flags = BASE_FLAGS + ISA_FLAGS[which]
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES), " ".join(flags).encode(), _compiler_version().encode(),
                 torch.__version__.encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return f"sparsec_cpu_{which}_{h.hexdigest()[:16]}", flags


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loaded() -> ModuleType | None:
    """This machine's kernels module if it is loaded already (never builds)."""
    return _loaded.get(isa())


def extension(which: str | None = None) -> ModuleType | None:
    """The compiled kernels module for ``which`` ISA (default: this machine's), or None."""
    which = which or isa()
    if which in _loaded:
        return _loaded[which]
    from filelock import FileLock

    name, flags = _key(which)
    root = cache_dir()
    build = root / name
    so = build / f"{name}.so"
    mod = None
    try:
        build.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{name}.lock")):
            if so.exists():
                mod = _import(name, so)
                _info[which] = {"name": name, "isa": which, "cached": True, "build_s": 0.0, "path": str(so)}
            else:
                from torch.utils.cpp_extension import load

                t0 = time.perf_counter()
                mod = load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), verbose=False)
                dt = time.perf_counter() - t0
                _info[which] = {"name": name, "isa": which, "cached": False, "build_s": dt, "path": str(so)}
                log.warning("sparsec: built the %s CPU kernels in %.1f s (cached in %s)", which, dt, build)
    except Exception as e:  # no compiler, no ninja, ...: correct but slow beats a crash
        warnings.warn(f"sparsec: could not build the {which} C++ kernels ({type(e).__name__}: {e}); "
                      "the sparse ops fall back to their plain-torch references", RuntimeWarning, stacklevel=2)
        mod = None
    if mod is not None and which == isa() and not _registered:
        # the dispatcher's CPU kernels for sparsec::sparse_linear / sparse_cats_mlp: calls
        # from compiled graphs then never enter Python
        from . import activation, nm  # noqa: F401  (define the schemas first)

        mod.register_ops()
        _registered.append(which)
    _loaded[which] = mod
    return mod


def build_info() -> dict[str, dict]:
    """What :func:`extension` built or loaded in this process: name, isa, cached, build seconds."""
    return dict(_info)


HUGE_PAGE = 2 << 20


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in memory the OS may back with 2 MiB transparent huge pages.

    The activation-sparse kernels read scattered rows of a prepared weight; with 4 KiB pages
    nearly every row starts with a TLB miss and a page walk. Measured here (1 thread, cold,
    fp32 batch 1, medians of 41 interleaved samples, two runs each): 4096x11008 at s = 0.9
    3.55-4.65 ms -> 2.53-2.54 ms, at s = 0.5 11.6-12.8 -> 9.6-9.9 ms; 4096x4096 at s = 0.9
    1.06-1.23 -> 0.91-0.94 ms; F.linear on the (4 KiB-paged) original weight moved by noise only.

    An anonymous mapping, 2 MiB-aligned, marked ``MADV_HUGEPAGE`` (Linux with THP in ``always``
    or ``madvise`` mode; elsewhere, or below 2 MiB, or with ``SPARSEC_HUGE_PAGES=0``, a plain
    ``torch.empty``). The tensor keeps the mapping alive and frees it when it dies.
    """
    nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
    if (nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or sys.platform != "linux"
            or os.environ.get("SPARSEC_HUGE_PAGES", "1") == "0"):
        return torch.empty(shape, dtype=dtype)
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(m)
        offset = -ctypes.addressof(probe) % HUGE_PAGE
        del probe  # a live export would keep the mapping from ever closing
        m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except (OSError, ValueError) as e:  # no THP support in this kernel, or no memory for the mapping
        log.debug("sparsec: no huge-page buffer (%s); using torch.empty", e)
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(tuple(shape))
