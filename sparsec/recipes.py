"""Recipes: which passes run, with which settings.

A recipe is a registered name (``"teal-40"``), a YAML/JSON file path, or a dict::

    {"passes": {"activation_threshold": {"mode": "teal", "sparsity": 0.5,
                                         "allocation": "greedy", "ignore": ["lm_head"]}}}

Each pass validates its section against its config dataclass: unknown keys fail with a
"did you mean", out-of-range values fail naming the key. The built-in named recipes are
registered by this module acting as a plugin, through the same hook third parties use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError, did_you_mean

__all__ = ["Recipe", "resolve_recipe", "build_config", "CompileOptions"]

_TOP_KEYS = ("passes", "name", "description")


@dataclass
class Recipe:
    name: str
    passes: dict[str, Any]  # pass name -> validated config dataclass instance
    description: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "passes": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(v) for k, v in self.passes.items()},
        }


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [(_check_type(v, item_tp, f"{where}[{i}]") if item_tp is not Any else v) for i, v in enumerate(value)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    return value


def build_config(cls, section: Any, where: str):
    """Validate ``section`` (a dict) against the dataclass ``cls``; ``where`` names it in errors."""
    if section is None:
        section = {}
    if dataclasses.is_dataclass(section) and isinstance(section, cls):
        section = dataclasses.asdict(section)
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping of settings, got {type(section).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in section.items():
        if key not in fields:
            raise RecipeError(f"{where}: unknown key {key!r}{did_you_mean(str(key), fields)}")
        kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
    try:
        cfg = cls(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except RecipeError as exc:
            raise RecipeError(f"{where}.{exc}") from None
    return cfg


def _load_file(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}): "
                          "a recipe is a YAML or JSON file") from None
    if "\0" in text:
        raise RecipeError(f"recipe file {str(path)!r} holds NUL bytes: a recipe is a YAML or JSON text file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
        return data
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping with a 'passes' key")
    return data


def resolve_recipe(recipe: Any, registry=None) -> Recipe:
    """Turn a recipe name, file path, dict or ``Recipe`` into a validated ``Recipe``."""
    from .plugins import get_registry

    if isinstance(recipe, Recipe):
        return recipe
    reg = registry or get_registry()
    name = "custom"
    if isinstance(recipe, (str, os.PathLike)):
        s = str(recipe)
        if s in reg.recipes:
            name, data = s, reg.recipes[s].recipe
        elif s.lower().endswith((".yaml", ".yml", ".json")) or os.sep in s:
            p = Path(s)
            if p.is_dir():
                raise RecipeError(f"recipe file {s!r} is a directory; give a YAML or JSON file (or a recipe name)")
            if not p.exists():
                raise RecipeError(f"recipe file {s!r} does not exist")
            if not (p.is_file() or p.is_fifo()):  # a pipe works: --recipe <(...); a device would not end
                raise RecipeError(f"recipe file {s!r} is not a regular file")
            data, name = _load_file(p), p.stem
        else:
            raise RecipeError(f"unknown recipe {s!r}{did_you_mean(s, reg.recipes)}")
    elif isinstance(recipe, dict):
        data = recipe
    else:
        raise RecipeError(f"a recipe is a name, a YAML/JSON path or a dict, not {type(recipe).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise RecipeError(f"recipe: unknown top-level key {key!r}{did_you_mean(str(key), _TOP_KEYS)}")
    passes = data.get("passes")
    if not isinstance(passes, dict) or not passes:
        raise RecipeError("recipe: 'passes' must be a non-empty mapping of pass name -> settings")
    configs = {}
    for pname, section in passes.items():
        p = reg.get_pass(pname)
        cls = getattr(p, "config_cls", None)
        configs[pname] = build_config(cls, section, f"passes.{pname}") if cls else dict(section or {})
    for pname in configs:  # combinations a pass cannot honour fail here, before any calibration
        check = getattr(reg.get_pass(pname), "check_recipe", None)
        if check is not None:
            check(configs)
    return Recipe(name=str(data.get("name", name)), passes=configs, description=str(data.get("description", "")))


def check_on_plugin_error(value: Any, where: str) -> None:
    if value not in ("raise", "skip"):
        raise RecipeError(f"{where}: on_plugin_error must be 'raise' or 'skip', got {value!r}")


@dataclass
class CompileOptions:
    """``torch.compile(..., backend="sparsec", options={...})``.

    - ``recipe``: what to do (name, path or dict); ignored when ``plan`` is given.
    - ``plan``: a calibrated ``sparsec.Plan`` (or a path to one).
    - ``on_plugin_error``: ``"raise"`` (default) or ``"skip"`` (warn and skip a failing pass).
    - ``dense_backend``: ``"inductor"`` (default) compiles the dense remainder with Inductor;
      ``"eager"`` runs the rewritten ATen graph as is (fast to set up, for evaluation/debug).
    - ``kernels``: ``"auto"`` (default) lowers the rewritten ops at compile time: prepared
      weight copies, fused groups and epilogues, C++ (CPU) or Triton (CUDA) kernels.
      ``"reference"`` skips that lowering: the graph keeps the passes' unfused ops
      (``sparsec::threshold_linear``, ``cats_mlp``, ``nm_linear``), which make their weight
      copies on first use and call the same kernels (pure torch where no kernel applies);
      for A/B checks of the lowering.
    """

    recipe: Any = None
    plan: Any = None
    on_plugin_error: str = "raise"
    dense_backend: str = "inductor"
    kernels: str = "auto"

    @classmethod
    def from_dict(cls, options: dict | None) -> "CompileOptions":
        options = dict(options or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise RecipeError(f"sparsec compile options: unknown option {key!r}{did_you_mean(str(key), names)}")
        opts = cls(**options)
        check_on_plugin_error(opts.on_plugin_error, "sparsec compile options")
        if opts.dense_backend not in ("inductor", "eager"):
            raise RecipeError(f"sparsec compile options: dense_backend must be 'inductor' or 'eager', got {opts.dense_backend!r}")
        if opts.kernels not in ("auto", "reference"):
            raise RecipeError(f"sparsec compile options: kernels must be 'auto' or 'reference', got {opts.kernels!r}")
        if opts.recipe is None and opts.plan is None:
            raise RecipeError("sparsec compile options: give a 'recipe' (e.g. 'teal-40') or a calibrated 'plan'")
        if opts.plan is not None:
            from .plan import Plan

            if not isinstance(opts.plan, (Plan, str, os.PathLike)):
                raise RecipeError(f"sparsec compile options: plan must be a sparsec.Plan or the path of a saved one, "
                                  f"got {type(opts.plan).__name__}")
            if opts.recipe is not None:
                raise RecipeError("sparsec compile options: give a 'recipe' or a 'plan', not both (a plan carries "
                                  "the recipe it was calibrated with)")
        return opts
