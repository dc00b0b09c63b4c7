"""Helpers for a pass's ``check_entry(key, entry, tensors)``: typed reads of plan entries and tensors.

Each helper returns the value it checked or raises ``PlanError`` naming the site and the key in one
line (``site 'model.layers.0.mlp.up_proj': 'threshold' is nan; it must be a finite number >= 0``);
``Plan.load`` puts the file in front. Problems with a tensor raise ``PlanTensorError``, which
``Plan.load`` reports against the tensors file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import PlanError

__all__ = ["PlanTensorError", "MISSING", "number", "one_of", "string", "names", "shapes", "numbers", "tensor",
           "describe"]

MISSING: Any = object()


class PlanTensorError(PlanError):
    """A plan tensor is missing or has the wrong dtype, shape or contents."""


def describe(value: Any) -> str:
    """How a bad value reads in a message: numbers plainly, others with their type."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)  # nan, inf, -0.5
    return f"{value!r} (a {type(value).__name__})"


def _absent(site: str, key: str, default: Any) -> Any:
    """What an absent key gives: ``default`` if it is optional, else a PlanError."""
    if default is MISSING:
        raise PlanError(f"site {site!r}: {key!r} is missing")
    return default


def number(entry: Mapping, site: str, key: str, *, lo: float | None = None, hi: float | None = None,
           hi_open: bool = False, integer: bool = False, default: Any = MISSING) -> Any:
    """A finite number (an int if ``integer``) in ``[lo, hi]`` (``[lo, hi)`` if ``hi_open``)."""
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]
    what = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        what += f" in [{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        what += f" >= {lo}"
    elif hi is not None:
        what += f" {'<' if hi_open else '<='} {hi}"
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and not isinstance(v, bool)
    if ok and lo is not None:
        ok = v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise PlanError(f"site {site!r}: {key!r} is {describe(v)}; it must be {what}")
    return v


def one_of(entry: Mapping, site: str, key: str, choices, *, default: Any = MISSING) -> Any:
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]
    if v not in choices or isinstance(v, bool):
        raise PlanError(f"site {site!r}: {key!r} is {v!r}; it must be one of {', '.join(map(repr, choices))}")
    return v


def string(entry: Mapping, site: str, key: str, *, default: Any = MISSING) -> Any:
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]
    if not isinstance(v, str):
        raise PlanError(f"site {site!r}: {key!r} is {describe(v)}; it must be a string")
    return v


def names(entry: Mapping, site: str, key: str, *, required: tuple[str, ...] = (), default: Any = MISSING) -> Any:
    """A mapping of strings to strings (``weights``: role -> parameter name) holding ``required``."""
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]
    if not (isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())):
        raise PlanError(f"site {site!r}: {key!r} must map roles to names, got {v!r}")
    for r in required:
        if r not in v:
            raise PlanError(f"site {site!r}: {key!r} has no {r!r}")
    return v


def shapes(entry: Mapping, site: str, key: str, *, required: dict[str, int] | None = None,
           default: Any = MISSING) -> Any:
    """A mapping of roles to shapes (lists of non-negative ints); ``required``: role -> rank."""
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]

    def size(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not (isinstance(v, dict) and all(isinstance(k, str) and isinstance(s, list) and all(map(size, s))
                                        for k, s in v.items())):
        raise PlanError(f"site {site!r}: {key!r} must map roles to lists of sizes, got {v!r}")
    for role, rank in (required or {}).items():
        if role not in v:
            raise PlanError(f"site {site!r}: {key!r} has no {role!r}")
        if len(v[role]) != rank or 0 in v[role]:
            raise PlanError(f"site {site!r}: {key!r}[{role!r}] is {v[role]}; it must be {rank} positive sizes")
    return v


def numbers(entry: Mapping, site: str, key: str, *, default: Any = MISSING) -> Any:
    """A list of numbers (any float, NaN included: a sample of weights)."""
    if key not in entry:
        return _absent(site, key, default)
    v = entry[key]
    if not (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise PlanError(f"site {site!r}: {key!r} must be a list of numbers, got {describe(v)}")
    return v


def tensor(tensors: Mapping, site: str, name: str, *, dtype: torch.dtype | None = None, floating: bool = False,
           shape: list[int] | None = None, why: str = "") -> torch.Tensor:
    """The plan tensor ``name``, of ``dtype`` (or any floating-point dtype) and ``shape``."""
    t = tensors.get(name)
    if t is None:
        raise PlanTensorError(f"site {site!r}: tensor {name!r} is missing")
    if not isinstance(t, torch.Tensor):
        raise PlanTensorError(f"site {site!r}: tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if dtype is not None and t.dtype != dtype:
        raise PlanTensorError(f"site {site!r}: tensor {name!r} has dtype {t.dtype}; it must be {dtype}")
    if floating and not t.is_floating_point():
        raise PlanTensorError(f"site {site!r}: tensor {name!r} has dtype {t.dtype}; it must be a floating-point dtype")
    if shape is not None and list(t.shape) != list(shape):
        raise PlanTensorError(f"site {site!r}: tensor {name!r} has shape {list(t.shape)}; it must be {list(shape)}"
                              + (f" ({why})" if why else ""))
    return t
