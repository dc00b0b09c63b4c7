"""Plans: everything calibration decided, saved as JSON + safetensors (never pickle).

A plan is a folder::

    smollm2.sparsec/
        plan.json            format version, recipe, one entry per rewritten site
        tensors.safetensors  per-site tensors (masks, packed weights; empty for thresholds)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError

__all__ = ["Plan", "FORMAT_VERSION"]

FORMAT_VERSION = 1


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
        if e.get("kind") != site.kind:
            raise PlanError(f"site {site.key!r}: the plan holds a {e.get('kind')!r} entry, the graph has a {site.kind!r} site")
        for role, shape in site.weight_shapes.items():
            planned = e.get("weight_shapes", {}).get(role)
            if planned is not None and list(planned) != list(shape):
                raise PlanError(
                    f"site {site.key!r}: {role} has shape {list(shape)} in this model but {list(planned)} in the plan"
                )
        return e

    def recipe_obj(self):
        from .recipes import resolve_recipe

        return resolve_recipe({k: v for k, v in self.recipe.items() if k in ("passes", "name", "description")})

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PlanError(f"cannot save the plan to {str(path)!r}: a file of that name exists (a plan is a folder)")
        try:
            path.mkdir(parents=True, exist_ok=True)
            doc = {
                "format": "sparsec-plan",
                "format_version": self.format_version,
                "meta": self.meta,
                "recipe": self.recipe,
                "sites": self.sites,
            }
            (path / "plan.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
            save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(path / "tensors.safetensors"))
        except OSError as exc:
            raise PlanError(f"cannot save the plan to {str(path)!r}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "plan.json").is_file():
            raise PlanError(f"{str(path)!r} is not a sparsec plan (no plan.json inside)")
        try:
            doc = json.loads((path / "plan.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{str(path / 'plan.json')!r} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise PlanError(f"{str(path / 'plan.json')!r} is damaged: not a JSON object")
        if doc.get("format") != "sparsec-plan":
            raise PlanError(f"{str(path)!r} is not a sparsec plan")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise PlanError(f"plan {str(path)!r} has format version {version}; this sparsec reads version {FORMAT_VERSION}")
        for key in ("recipe", "sites", "meta"):  # meta may be absent
            if not isinstance(doc.get(key, {} if key == "meta" else None), dict):
                raise PlanError(f"{str(path / 'plan.json')!r} is damaged: {key!r} is missing or not an object")
        tensors = {}
        if (path / "tensors.safetensors").exists():
            try:
                tensors = load_file(str(path / "tensors.safetensors"))
            except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
                raise PlanError(f"{str(path / 'tensors.safetensors')!r} cannot be read: {exc}") from None
        return cls(recipe=doc["recipe"], sites=doc["sites"], tensors=tensors, meta=doc.get("meta", {}), format_version=version)

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
