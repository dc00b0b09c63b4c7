"""``sparsec.report``: what was rewritten, as a table, JSON, or a picture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .plan import Plan

__all__ = ["Report", "report", "default_row"]


def default_row(key: str, e: dict) -> dict | None:
    """The row of an entry whose pass offers no ``report_row``: its weight bytes, unchanged."""
    dense = int(e.get("weight_bytes", 0))
    return {"kind": e.get("kind", "?"), "target": float(e.get("sparsity", 0.0) or 0.0),
            "measured": float(e.get("measured_sparsity", e.get("sparsity", 0.0)) or 0.0),
            "threshold": float(e.get("threshold", float("nan"))), "bytes_dense": dense,
            "bytes_sparse": int(e.get("bytes_sparse", dense))}


@dataclass
class Report:
    rows: list[dict]
    title: str = "sparsec report"

    @property
    def totals(self) -> dict:
        d = sum(r["bytes_dense"] for r in self.rows)
        s = sum(r["bytes_sparse"] for r in self.rows)
        return {"sites": len(self.rows), "bytes_dense": d, "bytes_sparse": s, "byte_ratio": (d / s) if s else None}

    def to_json(self) -> str:
        return json.dumps({"title": self.title, "sites": self.rows, "totals": self.totals}, indent=1)

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.title}: nothing was rewritten"
        cols = [("site", "site"), ("pass", "pass"), ("kind", "kind"), ("target", "target"),
                ("measured", "measured"), ("threshold", "threshold"), ("KiB/token dense", "kib_dense"),
                ("KiB/token sparse", "kib_sparse")]
        table = []
        for r in self.rows:
            table.append({
                "site": r["site"], "pass": r["pass"], "kind": r["kind"],
                "target": f"{r['target']:.1%}", "measured": f"{r['measured']:.1%}",
                "threshold": f"{r['threshold']:.4g}",
                "kib_dense": f"{r['bytes_dense'] / 1024:,.1f}", "kib_sparse": f"{r['bytes_sparse'] / 1024:,.1f}",
            })
        t = self.totals
        table.append({"site": f"total ({t['sites']} sites)", "pass": "", "kind": "", "target": "", "measured": "",
                      "threshold": "", "kib_dense": f"{t['bytes_dense'] / 1024:,.1f}",
                      "kib_sparse": f"{t['bytes_sparse'] / 1024:,.1f}"})
        width = {k: max(len(h), *(len(row[k]) for row in table)) for h, k in cols}
        right = {"target", "measured", "threshold", "kib_dense", "kib_sparse"}
        fmt = lambda row: "  ".join(row[k].rjust(width[k]) if k in right else row[k].ljust(width[k]) for _, k in cols)  # noqa: E731
        header = "  ".join(h.rjust(width[k]) if k in right else h.ljust(width[k]) for h, k in cols)
        rule = "-" * len(header)
        lines = [self.title, rule, header, rule, *(fmt(r) for r in table[:-1]), rule, fmt(table[-1])]
        if t["byte_ratio"]:
            lines.append(f"weight bytes per token: {t['byte_ratio']:.2f}x fewer than dense over the rewritten sites")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG of target and measured sparsity per site, in graph order."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from .errors import SparsecError

            raise SparsecError("Report.plot needs matplotlib: pip install 'sparsec[plot]'") from None
        from .errors import SparsecError

        path = Path(path)
        if path.is_dir():
            raise SparsecError(f"cannot write the plot to {str(path)!r}: it is a directory; give a file name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            why = "is not a directory" if parent.exists() else "does not exist"
            raise SparsecError(f"cannot write the plot to {str(path)!r}: {str(parent)!r} {why}")
        fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(self.rows) + 4), 4))
        x = range(len(self.rows))
        ax.bar(x, [r["measured"] for r in self.rows], color="#4c72b0", label="measured (calibration)")
        ax.plot(x, [r["target"] for r in self.rows], "k.", label="target")
        ax.set_ylim(0, 1)
        ax.set_ylabel("activation sparsity")
        ax.set_xlabel("site (graph order)")
        blocks = [r.get("block", "") for r in self.rows]
        ticks = [i for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
        ax.set_xticks(ticks)
        ax.set_xticklabels([blocks[i].rsplit(".", 1)[-1] or self.rows[i]["site"] for i in ticks], fontsize=7)
        ax.set_title(self.title)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=100)
        except OSError as exc:  # a read-only folder or file system, no space left, ...
            raise SparsecError(f"cannot write the plot to {str(path)!r}: {exc.strerror or exc}") from None
        except ValueError as exc:  # an extension matplotlib has no writer for
            raise SparsecError(f"cannot write the plot to {str(path)!r}: {' '.join(str(exc).split())}") from None
        finally:
            plt.close(fig)
        return path


def _rows(sites: dict[str, dict]) -> list[dict]:
    """One row per entry, made by the pass that wrote it (``report_row(key, entry)``: bytes read
    per token dense and sparse, target and measured sparsity; ``None`` leaves the site out)."""
    from .plugins import get_registry

    passes = get_registry().passes
    rows = []
    for key, e in sites.items():
        p = passes.get(e.get("pass", ""))
        row = p.report_row(key, e) if callable(getattr(p, "report_row", None)) else default_row(key, e)
        if row is None:
            continue
        rows.append({"site": key, "pass": e.get("pass", "?"), "block": e.get("block", ""), **row})
    return rows


def report(obj: Any) -> Report:
    """A report for a compiled model (after its first call), a ``Plan``, or a plan's path."""
    from .backend import compiled_sites

    if isinstance(obj, (str, Path)):
        obj = Plan.load(obj)
    if isinstance(obj, Plan):
        return Report(_rows(obj.sites), title=f"sparsec plan {obj.recipe.get('name', '')!r}")
    if isinstance(obj, torch.export.ExportedProgram):
        raise TypeError("sparsec.report takes the plan an export was made with: sparsec.report(plan)")
    if isinstance(obj, torch.nn.Module):
        sites = compiled_sites(list(obj.parameters()))  # every graph of its latest compile
        title = f"sparsec: {type(getattr(obj, '_orig_mod', obj)).__name__}"
        if not sites:
            title += " (nothing rewritten yet: a torch.compile'd model compiles on its first call)"
        return Report(_rows(sites), title=title)
    raise TypeError(f"sparsec.report takes a compiled model or a Plan, not {type(obj).__name__}")
