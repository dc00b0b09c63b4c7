"""Build and load sparsec's C++ CPU kernels (``kernels/<family>/csrc/*.cpp``, one extension).

Every family's sources are found by that pattern (a new family adds its folder, nothing here);
they share the headers in ``kernels/csrc/`` (``sparsec_common.h``: ISA macros, loads, the
active-row streaming, the threshold compares, the shared checks), which is on the include path.

Built once with ``torch.utils.cpp_extension`` and cached on disk outside the repository, in
``$SPARSEC_CACHE/ext`` (default ``~/.cache/sparsec/ext``). The cache key hashes the sources and
the shared headers, the compiler's version, the flags and the torch/python versions, so a change
to any of them builds anew and stale builds are never loaded. Each build runs in a private folder and is
published by one rename with its size and sha256 (``build.json``); every load checks both
before importing, and a damaged build is rebuilt (see "the on-disk cache" below). A file lock
makes two processes that build at the same time wait for one another, at most
``SPARSEC_BUILD_LOCK_TIMEOUT`` seconds (default 300; the second loads what the first built).
The first build is logged (about 35-40 s on the 2-core dev machine); later loads import the
shared object directly, without ninja (about 0.1 s).

The instruction set is chosen at build time from what torch reports for this CPU
(``torch.backends.cpu.get_cpu_capability()``): AVX-512 (f/bw/vl), AVX2+FMA, or a portable
build that the compiler auto-vectorises (Arm, old x86). ``SPARSEC_CPU_ISA=avx512|avx2|portable``
overrides it (the tests build all three).

If no compiler is available the build fails once, a warning says so, and the ops fall back to
their plain-torch references (correct, not fast).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ._common import HUGE_PAGE, empty_huge, version_of  # noqa: F401  (re-exported: older imports)

__all__ = ["extension", "loaded", "isa", "cache_dir", "build_info", "ISA_FLAGS", "empty_huge"]

log = logging.getLogger("sparsec.kernels")

_HERE = Path(__file__).parent

#: every family's C++ kernels, built into one extension (one build, one load); sorted, so the
#: build (and its cache key) does not depend on the order the file system lists them in
SOURCES = sorted(_HERE.glob("*/csrc/*.cpp"))
#: the headers the families share (``#include "sparsec_common.h"``): on the include path, and
#: hashed into the cache key with the sources, so an edit to one rebuilds
INCLUDE_DIR = _HERE / "csrc"
HEADERS = sorted(INCLUDE_DIR.glob("*.h"))

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
    for part in (*(f.read_bytes() for f in (*SOURCES, *HEADERS)), " ".join(flags).encode(),
                 _compiler_version().encode(), torch.__version__.encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return f"sparsec_cpu_{which}_{h.hexdigest()[:16]}", flags


def _families() -> list[str]:
    """The kernel family packages with C++ sources (``kernels/<family>/csrc/``), sorted."""
    return sorted(d.name for d in _HERE.iterdir() if (d / "csrc").is_dir() and (d / "__init__.py").is_file())


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
    name, flags = _key(which)
    mod = None
    try:
        mod, info = _load_or_build(name, which, flags)
        _info[which] = info
    except Exception as e:  # no compiler, no ninja, ...: correct but slow beats a crash
        warnings.warn(f"sparsec: could not build the {which} C++ kernels ({type(e).__name__}: {e}); "
                      "the sparse ops fall back to their plain-torch references", RuntimeWarning, stacklevel=2)
        mod = None
    if mod is not None and which == isa() and not _registered:
        # the extension's register_ops() makes its functions the dispatcher's CPU kernels of the
        # families' ops (calls from compiled graphs then never enter Python): every family
        # package with C++ sources defines its schemas on import, so import them first
        for family in _families():
            importlib.import_module(f"{__package__}.{family}")
        mod.register_ops()
        _registered.append(which)
    _loaded[which] = mod
    return mod


# ---- the on-disk cache ---------------------------------------------------------------------
#
# ``$SPARSEC_CACHE/ext/<key>/`` holds exactly two files once published: ``<module>.so`` and
# ``build.json`` (module name, file name, size, sha256). A build runs in a private
# ``ext/.build-<key>-XXXX/`` folder (torch's own ``lock`` file, the FileBaton that
# cpp_extension.load waits on for as long as it exists, is private to that process), the
# two files are put in a ``publish/`` folder inside it, and that folder is renamed to
# ``ext/<key>``: one rename publishes both, so a process killed at any moment leaves either
# no ``ext/<key>`` or a complete one (plus a private folder that later builds delete once it
# is an hour old). Every load checks the size and checksum before importing: a truncated or
# empty shared object would otherwise crash the process with SIGBUS or fail to load forever;
# a damaged one is moved aside and rebuilt. ``ext/<key>.lock`` (filelock, released by the
# OS when its holder dies) only keeps two processes from building the same key at once; a
# process waits for it at most SPARSEC_BUILD_LOCK_TIMEOUT seconds (default 300), then builds
# privately.

MANIFEST = "build.json"
STALE_S = 3600.0  #: private build folders older than this are left-overs of killed builds
_WAIT_DEFAULT_S = 300.0


def _lock_timeout() -> float:
    text = os.environ.get("SPARSEC_BUILD_LOCK_TIMEOUT")
    if not text:
        return _WAIT_DEFAULT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"SPARSEC_BUILD_LOCK_TIMEOUT={text!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"SPARSEC_BUILD_LOCK_TIMEOUT={text!r}: expected a number of seconds >= 0")
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _published(final: Path) -> tuple[dict | None, str | None]:
    """The manifest of the complete, intact build published in ``final`` (with ``path`` set
    to its shared object), or ``(None, why not)``; ``why not`` is None when nothing is there."""
    if not os.path.lexists(final):
        return None, None
    man_path = final / MANIFEST
    try:
        man = json.loads(man_path.read_text())
        so = final / Path(str(man["file"])).name
        size, digest, module = int(man["size"]), str(man["sha256"]), str(man["module"])
    except FileNotFoundError:
        return None, f"{final} has no {MANIFEST} (an unfinished build, or one made by an older sparsec)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{man_path} is unreadable ({type(exc).__name__}: {exc})"
    if not module.isidentifier():
        return None, f"{man_path} names no valid module ({module!r})"
    try:
        actual = so.stat().st_size
    except OSError:
        return None, f"{so} is missing"
    if actual != size:
        return None, f"{so} has {actual} bytes, {size} were built"
    if _sha256(so) != digest:
        return None, f"{so} does not match the sha256 recorded when it was built"
    return {**man, "path": str(so)}, None


def _load_published(final: Path, which: str, name: str) -> tuple[ModuleType | None, dict | None, str | None]:
    man, why = _published(final)
    if man is None:
        return None, None, why
    mod = _import(man["module"], Path(man["path"]))
    return mod, {"name": name, "isa": which, "cached": True, "build_s": 0.0, "path": man["path"]}, None


def _acquire(lock, which: str, timeout: float) -> bool:
    """Take the build lock, waiting at most ``timeout`` s (and saying so); False if not taken."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
        return True
    except Timeout:
        pass
    except OSError as exc:  # a read-only cache folder, say: the private build reports it
        log.warning("sparsec: cannot take the build lock %s (%s); building without it", lock.lock_file, exc)
        return False
    log.warning("sparsec: another process is building the %s CPU kernels; waiting up to %.0f s for its lock %s",
                which, timeout, lock.lock_file)
    try:
        lock.acquire(timeout=timeout)
        return True
    except Timeout:
        log.warning("sparsec: the lock %s was still held after %.0f s (SPARSEC_BUILD_LOCK_TIMEOUT); "
                    "building the %s CPU kernels privately", lock.lock_file, timeout, which)
        return False


def _load_or_build(name: str, which: str, flags: list[str]) -> tuple[ModuleType, dict]:
    from filelock import FileLock

    root = cache_dir()
    if not root.is_dir():  # a read-only cache that holds the build is fine: loading writes nothing
        root.mkdir(parents=True, exist_ok=True)
    final = root / name
    mod, info, why = _load_published(final, which, name)
    if mod is not None:
        return mod, info
    lock = FileLock(str(root / f"{name}.lock"))
    held = _acquire(lock, which, _lock_timeout())
    try:
        if held:  # another process may have published it while this one waited
            mod, info, why_now = _load_published(final, which, name)
            if mod is not None:
                return mod, info
            why = why_now
        if why is not None:
            log.warning("sparsec: rebuilding the %s CPU kernels: %s", which, why)
        return _build(name, which, flags, root, final)
    finally:
        if held:
            lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _clean_stale(root: Path) -> None:
    """Delete the private build folders (and set-aside damaged builds) of processes that died
    more than STALE_S ago; a live build touches its folder far more often than that."""
    now = time.time()
    for entry in root.iterdir():
        if entry.name.startswith((".build-", ".trash-")):
            try:
                if now - entry.lstat().st_mtime > STALE_S:
                    _remove(entry)
            except OSError:
                pass


def _publish(stage: Path, final: Path, root: Path, name: str) -> bool:
    """Rename ``stage`` to ``final``; False if another process published a sound build there
    first (kept). Anything else in the way (a damaged or unfinished build, an older
    sparsec's folder) is moved aside and deleted."""
    for _ in range(5):
        try:
            os.rename(stage, final)
            _fsync(root)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if _published(final)[0] is not None:
            return False
        aside = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=root))
        try:
            os.rename(final, aside / "old")
        except FileNotFoundError:
            pass
        _remove(aside)
    raise RuntimeError(f"could not publish the build to {final}: something kept re-creating it")


def _build(name: str, which: str, flags: list[str], root: Path, final: Path) -> tuple[ModuleType, dict]:
    from torch.utils.cpp_extension import load

    _clean_stale(root)
    private = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=root))
    try:
        t0 = time.perf_counter()
        mod = load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   extra_include_paths=[str(INCLUDE_DIR)], build_directory=str(private), verbose=False)
        dt = time.perf_counter() - t0
        built = Path(mod.__file__)  # <name>.so, or <name>_v1.so when this process built ``name`` before
        size = built.stat().st_size
        if size == 0:
            raise RuntimeError(f"the linker wrote an empty {built}")
        stage = private / "publish"
        stage.mkdir()
        os.replace(built, stage / built.name)
        _fsync(stage / built.name)
        manifest = {"module": mod.__name__, "file": built.name, "size": size, "sha256": _sha256(stage / built.name),
                    "key": name, "isa": which, "flags": flags, "torch": torch.__version__, "build_s": round(dt, 1)}
        with open(stage / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(stage)
        if _publish(stage, final, root, name):
            log.warning("sparsec: built the %s CPU kernels in %.1f s (cached in %s)", which, dt, final)
        else:
            log.warning("sparsec: built the %s CPU kernels in %.1f s; another process published them first "
                        "(kept, in %s)", which, dt, final)
        return mod, {"name": name, "isa": which, "cached": False, "build_s": dt, "path": str(final / built.name)}
    finally:
        shutil.rmtree(private, ignore_errors=True)


def build_info() -> dict[str, dict]:
    """What :func:`extension` built or loaded in this process: name, isa, cached, build seconds."""
    return dict(_info)
