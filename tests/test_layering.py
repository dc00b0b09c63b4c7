"""Layering (../shared/ARCHITECTURE.md), checked on the sources: no import cycles among module-level
imports; kernels never import passes; core (``sparsec/``) imports no pass family and no kernel
family by name (``sparsec.kernels._common`` is the shared leaf it may use); the shared Triton
machinery (``kernels/_triton``) imports no family.

``CORE_DEBT`` lists the core imports of a family that remain until the restructure moves that
code into its family (issue "Seams"); the test fails on any import not listed, and on a listed
one that has gone (so the list only shrinks)."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sparsec": ROOT / "sparsec", "sparsec.passes": ROOT / "passes", "sparsec.kernels": ROOT / "kernels",
            "sparsec.models": ROOT / "models"}

#: (core module, family module it still imports): each goes when its code moves into the family
CORE_DEBT: set[tuple[str, str]] = set()  # empty: add an entry only with the issue that removes it


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "sparsec" and parts and parts[0] in ("passes", "kernels", "models"):
                continue
            out[name] = f
    return out


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.startswith("sparsec")}


def family_of(module: str) -> str | None:
    """``sparsec.passes.nm_weights.x`` -> ``sparsec.passes.nm_weights``; None for non-family modules."""
    for pkg in ("sparsec.passes", "sparsec.kernels"):
        if module.startswith(pkg + "."):
            first = module[len(pkg) + 1:].split(".")[0]
            return None if (pkg, first) == ("sparsec.kernels", "_common") else f"{pkg}.{first}"
    return None


def test_no_import_cycles():
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        for dep in imports(name, path, top_level_only=True):
            if dep in mods and dep != name:
                g.add_edge(name, dep)
    cycles = list(nx.simple_cycles(g))
    assert cycles == [], f"module-level import cycles: {cycles[:5]}"


def test_kernels_never_import_passes():
    bad = [(n, d) for n, p in modules().items() if n.startswith("sparsec.kernels")
           for d in imports(n, p, top_level_only=False) if d.startswith("sparsec.passes")]
    assert bad == []


def test_shared_triton_machinery_imports_no_family():
    """``kernels/_triton`` is generic: the families import it and register their templates."""
    bad = [(n, d) for n, p in modules().items() if n.startswith("sparsec.kernels._triton")
           for d in imports(n, p, top_level_only=False)
           if family_of(d) not in (None, "sparsec.kernels._triton") or d.startswith("sparsec.passes")]
    assert bad == []


def test_core_imports_no_family_by_name():
    mods = modules()
    found = set()
    for name, path in mods.items():
        if name.split(".")[1:2] in (["passes"], ["kernels"], ["models"]):
            continue
        for dep in imports(name, path, top_level_only=False):
            fam = family_of(dep)
            if fam is not None and (dep in mods or dep == fam):
                found.add((name, fam))
    assert found - CORE_DEBT == set(), "core imports a family by name: move the code into the family, behind a hook"
    assert CORE_DEBT - found == set(), "a listed import is gone: remove it from CORE_DEBT"
