"""Errors sparsec raises. Every message names the thing that is wrong."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["SparsecNotice", "SparsecError", "RecipeError", "PlanError", "PluginError", "PassError", "ExportError", "did_you_mean"]


class SparsecNotice(UserWarning):
    """A one-line notice: sparsec compiled something densely, calibrated on the fly, or a pass
    of the recipe found nothing to do."""


class SparsecError(Exception):
    """Base class of every error sparsec raises on purpose."""


class RecipeError(SparsecError, ValueError):
    """A recipe or compile option is malformed (unknown key, value out of range, ...)."""


class PlanError(SparsecError, ValueError):
    """A plan does not fit the model it is applied to, or its file is unreadable."""


class PluginError(SparsecError):
    """A plugin misbehaved: duplicate names, a hook that raised, bad pass ordering."""


class PassError(SparsecError):
    """A pass failed while matching or rewriting a graph."""


class ExportError(SparsecError):
    """An export cannot be written: a bad path, an op with no translation, a failed check."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else the list of valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(map(repr, choices)) or 'none'})"
