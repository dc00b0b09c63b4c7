"""Plans: everything calibration decided, saved as JSON + safetensors (never pickle).

A plan is a folder::

    smollm2.sparsec/
        plan.json                          format version, recipe, one entry per rewritten site, and
                                           the name, size and sha256 of the tensors file
        tensors-<sha256[:16]>.safetensors  per-site tensors (packed weights; none for thresholds)
        .plan.lock                         held while a save writes into the folder

``Plan.save`` writes the tensors file first, under a name derived from its checksum, then
replaces ``plan.json`` atomically: that rename is the commit point, so a save killed at any
moment leaves the old plan or the new one, never a mix. Saves take the folder's lock (two at
once would interleave), fsync what they write, turn write failures into a ``PlanError`` that
leaves the old plan in place, and remove tensors files no ``plan.json`` names any more.

``Plan.load`` checks the tensors file against the recorded sha256 and asks the pass that made
each entry (``entry["pass"]``, through the plugin registry) to check the entry and its tensors
(``Pass.check_entry``). Format version 1 (``plan.json`` + ``tensors.safetensors``, no checksum)
still loads, with its entries checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError
from .plancheck import PlanTensorError, describe

__all__ = ["Plan", "FORMAT_VERSION"]

FORMAT_VERSION = 2
#: format versions this sparsec reads
READABLE_VERSIONS = (1, 2)
PLAN_FILE = "plan.json"
LOCK_FILE = ".plan.lock"
#: the tensors file of format version 1
V1_TENSORS_FILE = "tensors.safetensors"
#: how long a save waits for another process's save into the same folder
SAVE_LOCK_TIMEOUT_S = 300.0
_TENSORS_FILE_RE = re.compile(r"tensors-[0-9a-f]{16}\.safetensors")
#: temporaries of interrupted saves: ours, and those safetensors writes before renaming
_TEMP_FILE_RE = re.compile(r"\.(?:tensors|plan)-\d+-[0-9a-f]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")


@dataclass(eq=False)  # by identity: torch.compile compares options with ==, and tensors have no truth value
class Plan:
    recipe: dict  # the validated recipe, as a dict (Recipe.to_dict())
    sites: dict[str, dict] = field(default_factory=dict)  # site key -> entry
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- use -----------------------------------------------------------------------------------
    def entry_for(self, site) -> dict:
        """The entry for a matched site; a clear error if the plan was made for another model."""
        e = self.sites.get(site.key)
        if e is None:
            parts = site.key.split(".")
            for i in range(1, len(parts)):  # calibrated on a submodule of what is compiled?
                if ".".join(parts[i:]) in self.sites:
                    inner = ".".join(parts[:i])
                    raise PlanError(
                        f"the plan has no site {site.key!r} but has {'.'.join(parts[i:])!r}: it was calibrated "
                        f"on the module that is {inner!r} here. Calibrate a plan on the module you compile, or "
                        "compile the one the plan was made for."
                    )
            known = ", ".join(list(self.sites)[:4])
            raise PlanError(
                f"the plan has no site {site.key!r} ({site.kind}, pass {site.pass_name!r}); it was made for "
                f"another model ({self.meta.get('model', '?')}, sites {known}, ...): calibrate a plan for this model"
            )
        owner = e.get("pass", site.pass_name) if isinstance(e, dict) else site.pass_name
        if owner != site.pass_name:
            raise PlanError(f"site {site.key!r}: the plan's entry was made by pass {owner!r}, but pass "
                            f"{site.pass_name!r} matched the site here (a plan's entries belong to the pass that made them)")
        self._check_entry(site.key, e, pass_name=site.pass_name, strict=False)
        if e.get("kind") != site.kind:
            raise PlanError(f"site {site.key!r}: the plan holds a {e.get('kind')!r} entry, the graph has a {site.kind!r} site")
        for role, shape in site.weight_shapes.items():
            planned = e.get("weight_shapes", {}).get(role)
            if planned is not None and list(planned) != list(shape):
                raise PlanError(
                    f"site {site.key!r}: {role} has shape {list(shape)} in this model but {list(planned)} in the plan"
                )
        return e

    def add_entries(self, pass_name: str, entries: Mapping[str, dict]) -> None:
        """Store the entries pass ``pass_name`` made, each marked with ``"pass"``. Site keys are
        namespaced by the pass that owns them: an entry naming another pass, or a key another
        pass already holds, is a ``PlanError`` naming both (two passes must key their sites
        apart; the N:M pass suffixes ``:nm`` for that)."""
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise PlanError(f"pass {pass_name!r} made a {type(entry).__name__} for site {key!r}, not an entry (a dict)")
            claimed = entry.get("pass", pass_name)
            if claimed != pass_name:
                raise PlanError(f"pass {pass_name!r} made the entry for site {key!r} in the name of pass {claimed!r}")
            held = self.sites.get(key)
            if isinstance(held, dict) and held.get("pass", pass_name) != pass_name:
                raise PlanError(f"site {key!r} is claimed by two passes, {held['pass']!r} and {pass_name!r}: "
                                "each pass must key its sites apart (the plan holds one entry per key)")
        for key, entry in entries.items():
            self.sites[key] = {**entry, "pass": pass_name}

    def recipe_obj(self):
        from .recipes import resolve_recipe

        return resolve_recipe({k: v for k, v in self.recipe.items() if k in ("passes", "name", "description")})

    # -- checks --------------------------------------------------------------------------------
    def check(self) -> None:
        """Check every entry with the pass that made it (``Pass.check_entry``): ``PlanError``
        naming the site and the key. ``load`` and ``save`` call it; ``entry_for`` checks the
        entry it returns."""
        for key, entry in self.sites.items():
            self._check_entry(key, entry)

    def _check_entry(self, key: str, entry: Any, pass_name: str | None = None, strict: bool = True) -> None:
        """Ask the entry's pass to check it. ``pass_name``: the pass to assume when the entry
        names none (plans built in memory); ``strict=False``: skip passes the process-wide
        registry does not know (a pass running from a registry of its own). An entry is checked
        again only when it or a tensor its check read has changed since."""
        from .plugins import get_registry

        if not isinstance(entry, dict):
            raise PlanError(f"site {key!r}: the entry is a {type(entry).__name__}, not an object")
        if "pass" not in entry and pass_name is None:
            raise PlanError(f"site {key!r}: 'pass' is missing")
        name = entry.get("pass", pass_name)
        if not isinstance(name, str):
            raise PlanError(f"site {key!r}: 'pass' is {describe(name)}; it must be the name of a pass")
        passes = get_registry().passes
        p = passes.get(name)
        if p is None:
            if not strict:
                return
            raise PlanError(f"site {key!r} was made by pass {name!r}, which is not registered (is the plugin that "
                            f"provides it installed? registered: {', '.join(sorted(passes)) or 'none'})")
        check = getattr(p, "check_entry", None)
        if check is None:
            return
        cache = self.__dict__.setdefault("_checked", {})
        try:
            text = json.dumps(entry, sort_keys=True, default=repr)
        except (TypeError, ValueError):  # keys json cannot sort: check every time
            text = None
        seen = cache.get(key)
        if seen is not None and text is not None and seen[0] == text and seen[1] == _idents(self.tensors, seen[1]):
            return
        used = _Reads(self.tensors)
        try:
            check(key, entry, used)
        except PlanError:
            raise
        except Exception as exc:  # a check that trips over a malformed entry
            raise PlanError(f"site {key!r}: pass {name!r} could not check its entry: {type(exc).__name__}: {exc}") from None
        cache[key] = (text, _idents(self.tensors, {n: None for n in used.read}))

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the plan to the folder ``path`` (made if needed): the tensors file under its
        checksum's name, then ``plan.json`` replaced atomically, under the folder's lock.
        Everything that can be checked is checked before the disk is touched; a failed write
        raises ``PlanError`` and leaves the plan that was there (if any) as it was."""
        from filelock import FileLock, Timeout

        path = Path(path)
        where = f"cannot save the plan to {str(path)!r}"
        if path.exists() and not path.is_dir():
            raise PlanError(f"{where}: a file of that name exists (a plan is a folder)")
        tensors = {}
        for k, v in self.tensors.items():
            if not isinstance(v, torch.Tensor):
                raise PlanError(f"{where}: tensor {k!r} is a {type(v).__name__}, not a torch.Tensor")
            try:
                tensors[k] = v.detach().contiguous().cpu()
            except Exception as exc:  # a meta or otherwise unreadable tensor
                raise PlanError(f"{where}: tensor {k!r} cannot be copied to the CPU: {exc}") from None
        doc = {"format": "sparsec-plan", "format_version": FORMAT_VERSION, "meta": self.meta, "recipe": self.recipe,
               "sites": self.sites}
        for key in ("meta", "recipe", "sites"):
            if not isinstance(doc[key], dict):
                raise PlanError(f"{where}: {key} is a {type(doc[key]).__name__}, not a dict")
            try:
                json.dumps(doc[key])
            except ValueError as exc:  # a structure that contains itself
                bad = f"{key} is not JSON ({exc})"
            except TypeError:
                bad = _not_json(doc[key], key) or f"{key} is not JSON"
            else:
                bad = _not_json(doc[key], key)  # what json.dumps takes but would not read back (int keys)
            if bad:
                raise PlanError(f"{where}: {bad}; a plan's meta, recipe and sites must be JSON (str, numbers, "
                                "bools, None, lists, dicts with string keys)")
        try:
            self.check()
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PlanError(f"{where}: {exc.strerror or exc}") from None
        lock = FileLock(str(path / LOCK_FILE), timeout=SAVE_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise PlanError(f"{where}: waited {SAVE_LOCK_TIMEOUT_S:g} s for the lock {str(path / LOCK_FILE)!r}: "
                            "another process is saving a plan there (the lock ends with that process)") from None
        except OSError as exc:
            raise PlanError(f"{where}: cannot take the lock {str(path / LOCK_FILE)!r}: {exc.strerror or exc}") from None
        try:
            _commit(path, tensors, doc, where)
        finally:
            with contextlib.suppress(OSError):
                _remove_orphans(path)  # of this save if it failed, of the plan it replaced if not
            lock.release()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan folder: its tensors file checked against the sha256 recorded in
        ``plan.json``, and every entry checked by the pass that made it. Any problem is a
        ``PlanError`` naming the file (and the site and key)."""
        path = Path(path)
        jpath = path / PLAN_FILE
        for _ in range(5):
            raw = _read_plan_json(path)
            doc = _parse_plan_json(raw, path)
            tfile, recorded = _tensors_file(doc, path)
            try:
                tensors = _read_tensors(tfile, recorded)
                break
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if jpath.read_bytes() != raw:
                        continue  # a save replaced the plan (and removed its old tensors) meanwhile: read it again
                raise PlanError(f"{str(tfile)!r} is missing: {str(jpath)!r} names it as the plan's tensors file "
                                "(was the folder copied in part?)") from None
        else:
            raise PlanError(f"{str(jpath)!r} kept changing while it was read (saves in a loop?)")
        plan = cls(recipe=doc["recipe"], sites=doc["sites"], tensors=tensors, meta=doc.get("meta", {}),
                   format_version=doc["format_version"])
        for key, entry in plan.sites.items():
            try:
                plan._check_entry(key, entry)
            except PlanTensorError as exc:
                raise PlanError(f"{str(tfile or path / V1_TENSORS_FILE)!r}: {exc}") from None
            except PlanError as exc:
                raise PlanError(f"{str(jpath)!r}: {exc}") from None
        return plan

    @staticmethod
    def new_meta(model: Any = None, **extra) -> dict:
        import sparsec

        meta = {"sparsec_version": sparsec.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if model is not None:
            meta["model"] = type(model).__name__
        meta.update(extra)
        return meta

    def __repr__(self) -> str:
        return f"<sparsec.Plan {self.recipe.get('name', '?')!r}: {len(self.sites)} sites>"


# ---- files ------------------------------------------------------------------------------------------


def _commit(path: Path, tensors: dict, doc: dict, where: str) -> None:
    """Write the tensors file, then replace plan.json: the commit point. Called under the lock."""
    from safetensors.torch import save_file

    try:
        tmp = path / f".tensors-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            save_file(tensors, str(tmp))
        except OSError:
            raise
        except Exception as exc:  # safetensors reports I/O errors (a full disk) as SafetensorError
            raise _WriteError(f"writing the tensors failed: {exc}") from None
        digest, size = _digest(tmp, check_layout=True)
        _fsync_file(tmp)
        name = f"tensors-{digest[:16]}.safetensors"
        os.replace(tmp, path / name)  # the same name holds the same bytes: replacing it changes nothing
        _fsync_dir(path)
        doc = {**doc, "tensors": {"file": name, "sha256": digest, "bytes": size}}
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
        tmp = path / f".plan-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path / PLAN_FILE)  # commit
    except OSError as exc:
        raise PlanError(f"{where}: {exc.strerror or exc}; the plan there (if any) is unchanged") from None
    except _WriteError as exc:
        raise PlanError(f"{where}: {exc}; the plan there (if any) is unchanged") from None
    try:
        _fsync_dir(path)
    except OSError as exc:
        warnings.warn(f"sparsec: the plan was saved to {str(path)!r}, but syncing the folder failed "
                      f"({exc.strerror or exc}): a crash now could lose the save", RuntimeWarning, stacklevel=3)


class _WriteError(Exception):
    pass


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    """Make renames inside ``p`` durable (POSIX; other systems cannot open a folder)."""
    if os.name == "posix":
        _fsync_file(p)


def _digest(p: Path, check_layout: bool = False) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read in chunks. ``check_layout``: also check that the
    safetensors header's tensors end where the file does (a short write on a full disk may
    not raise)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if check_layout:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = f.read(n) if 0 <= n <= size else b""
            h.update(head)
            h.update(header)
            try:
                spans = [v["data_offsets"][1] for k, v in json.loads(header).items() if k != "__metadata__"]
                expected = 8 + n + max(spans, default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                expected = None
            if expected != size:
                raise _WriteError(f"the tensors file came out {size} bytes long, not {expected} "
                                  "(is the disk full?)")
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest(), size


def _read_plan_json(path: Path) -> bytes:
    jpath = path / PLAN_FILE
    try:
        return jpath.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise PlanError(f"{str(path)!r} is not a sparsec plan (no plan.json inside)") from None
    except OSError as exc:
        raise PlanError(f"{str(jpath)!r} cannot be read: {exc.strerror or exc}") from None


def _parse_plan_json(raw: bytes, path: Path) -> dict:
    jpath = str(path / PLAN_FILE)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{jpath!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{jpath!r} is damaged: not a JSON object")
    if doc.get("format") != "sparsec-plan":
        raise PlanError(f"{str(path)!r} is not a sparsec plan")
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PlanError(f"plan {str(path)!r} has format version {version}; this sparsec reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("recipe", "sites", "meta"):  # meta may be absent
        if not isinstance(doc.get(key, {} if key == "meta" else None), dict):
            raise PlanError(f"{jpath!r} is damaged: {key!r} is missing or not an object")
    return doc


def _tensors_file(doc: dict, path: Path) -> tuple[Path | None, dict | None]:
    """The tensors file a plan.json names, with its recorded size and sha256 (version 2), or
    version 1's ``tensors.safetensors`` (no checksum; absent when the plan had no tensors)."""
    if doc["format_version"] == 1:
        f = path / V1_TENSORS_FILE
        return (f if f.exists() else None), None
    t = doc.get("tensors")
    if not (isinstance(t, dict) and isinstance(t.get("file"), str) and _TENSORS_FILE_RE.fullmatch(t["file"])
            and isinstance(t.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", t["sha256"])
            and isinstance(t.get("bytes"), int) and t["bytes"] >= 0):
        raise PlanError(f"{str(path / PLAN_FILE)!r} is damaged: 'tensors' must give the tensors file's name, sha256 "
                        f"and size, got {t!r}")
    return path / t["file"], t


def _read_tensors(tfile: Path | None, recorded: dict | None) -> dict[str, torch.Tensor]:
    """The tensors, after checking the file against its recorded size and sha256.
    ``FileNotFoundError`` if the file is gone (``load`` reads plan.json again)."""
    from safetensors.torch import load_file

    if tfile is None:
        return {}
    if recorded is not None:
        try:
            digest, size = _digest(tfile)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise PlanError(f"{str(tfile)!r} cannot be read: {exc.strerror or exc}") from None
        if size != recorded["bytes"]:
            raise PlanError(f"{str(tfile)!r} is damaged: it has {size} bytes, plan.json records {recorded['bytes']} "
                            "(cut short?)")
        if digest != recorded["sha256"]:
            raise PlanError(f"{str(tfile)!r} is damaged: its sha256 is {digest}, plan.json records "
                            f"{recorded['sha256']} (it changed after it was saved)")
    try:
        return load_file(str(tfile))
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
        raise PlanError(f"{str(tfile)!r} cannot be read: {exc}") from None


def _remove_orphans(path: Path) -> None:
    """Under the lock: remove the temporaries of interrupted saves and the tensors files that
    the folder's plan.json does not name (all of them if there is no plan.json; none if it
    cannot be read)."""
    try:
        doc = json.loads((path / PLAN_FILE).read_bytes())
        t = doc.get("tensors") if doc.get("format_version") != 1 else {"file": V1_TENSORS_FILE}
        keep = t.get("file") if isinstance(t, dict) else None
        known = True
    except FileNotFoundError:
        keep, known = None, True
    except Exception:  # a damaged plan.json: leave its files alone
        keep, known = None, False
    for f in path.iterdir():
        n = f.name
        orphan = known and n != keep and (n == V1_TENSORS_FILE or _TENSORS_FILE_RE.fullmatch(n))
        if orphan or _TEMP_FILE_RE.fullmatch(n):
            with contextlib.suppress(OSError):
                f.unlink()


def _not_json(value: Any, where: str) -> str | None:
    """Where ``value`` stops being JSON (``meta['model'] is not JSON (object)``), or None."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _not_json(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has the key {k!r}, not a string"
            bad = _not_json(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    return f"{where} is not JSON ({type(value).__name__})"


class _Reads(Mapping):
    """The plan's tensors, recording which names a check read."""

    def __init__(self, tensors: Mapping):
        self._tensors = tensors
        self.read: set[str] = set()

    def __getitem__(self, name):
        self.read.add(name)
        return self._tensors[name]

    def __contains__(self, name):
        self.read.add(name)
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


def _idents(tensors: Mapping, names) -> dict:
    """What identifies each named tensor's current contents: object, version, dtype, shape."""
    out = {}
    for n in names:
        t = tensors.get(n)
        if t is None or not isinstance(t, torch.Tensor):
            out[n] = repr(type(t))
            continue
        try:
            version = t._version
        except Exception:  # inference tensors keep no version counter
            version = -1
        out[n] = (id(t), version, t.dtype, tuple(t.shape))
    return out
