"""SmolLM2 perplexity on the evaluation windows for the activation and N:M weight recipes.

    python bench/quality.py [--windows 8] [--length 512] [--only NAME ...] [--json out.json]

Calibration: 16 windows x 128 tokens from the first half of the pydoc text (batches of 4;
the last batch is held out for the greedy search). Evaluation: windows from the second half.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sparsec
from sparsec.evaluate import perplexity, sparse_model
from sparsec.models.data import calibration_windows, evaluation_windows
from sparsec.models.llama import smollm2

def _at(**kw):
    return {"activation_threshold": kw}


def _nm(**kw):
    return {"nm_weights": kw}


def _rs(**kw):
    return {"rsparse": kw}


RECIPES = {
    "teal-25 uniform": _at(mode="teal", sparsity=0.25, allocation="uniform"),
    "teal-40 uniform": _at(mode="teal", sparsity=0.40, allocation="uniform"),
    "teal-50 uniform": _at(mode="teal", sparsity=0.50, allocation="uniform"),
    "teal-40 greedy": _at(mode="teal", sparsity=0.40, allocation="greedy"),
    "teal-50 greedy": _at(mode="teal", sparsity=0.50, allocation="greedy"),
    "teal-40 greedy model": _at(mode="teal", sparsity=0.40, allocation="greedy", greedy_scope="model"),
    "teal-50 greedy model": _at(mode="teal", sparsity=0.50, allocation="greedy", greedy_scope="model"),
    "cats-50": _at(mode="cats", sparsity=0.50),
    "2:4 magnitude": _nm(n=2, m=4, method="magnitude"),
    "2:4 wanda": _nm(n=2, m=4, method="wanda"),
    "2:4 sparsegpt": _nm(n=2, m=4, method="sparsegpt"),
    "4:8 wanda": _nm(n=4, m=8, method="wanda"),
    "4:8 sparsegpt": _nm(n=4, m=8, method="sparsegpt"),
    "50% wanda": _nm(structure="unstructured", sparsity=0.5, method="wanda"),
    "50% sparsegpt": _nm(structure="unstructured", sparsity=0.5, method="sparsegpt"),
    "2:4 sparsegpt + teal-40": {**_at(mode="teal", sparsity=0.40, allocation="greedy"),
                                **_nm(n=2, m=4, method="sparsegpt")},
    # R-Sparse at a bytes density (sparse rows + factors read per token / dense weight bytes)
    "rsparse-50 fixed a=0.5": _rs(density=0.5, search="fixed", alpha=0.5),
    "rsparse-50 a=1 (no rank)": _rs(density=0.5, search="fixed", alpha=1.0),
    "rsparse-50 layer": _rs(density=0.5, search="layer"),
    "rsparse-50 greedy": _rs(density=0.5, search="greedy"),
    "rsparse-40 greedy": _rs(density=0.4, search="greedy"),
    "rsparse-60 greedy": _rs(density=0.6, search="greedy"),
}


def _density(plan) -> float:
    """Weight bytes read per token over the dense bytes, on the rewritten sites (the report's
    count: measured masks on the calibration tokens)."""
    rows = sparsec.report(plan).rows
    dense = sum(r["bytes_dense"] for r in rows)
    return sum(r["bytes_sparse"] for r in rows) / dense if dense else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model, tok = smollm2()
    ev = evaluation_windows(tok, a.windows, a.length)
    cal = calibration_windows(tok, 16, 128, batch=4)
    dense = perplexity(model, ev)
    rows = [{"recipe": "dense", "ppl": dense, "delta": 0.0, "seconds": 0.0, "density": 1.0}]
    print(f"{'recipe':<26}{'ppl':>9}{'vs dense':>10}{'density':>9}{'calib s':>9}", flush=True)
    print(f"{'dense':<26}{dense:9.3f}{'':>10}", flush=True)
    for name, section in RECIPES.items():
        if a.only and name not in a.only:
            continue
        # each recipe compiles the model twice (calibration probe, evaluation): without a reset
        # dynamo reaches its recompile limit (8) and silently runs later recipes eagerly, dense
        torch._dynamo.reset()
        t = time.time()
        plan = sparsec.calibrate(model, cal, {"name": name, "passes": section}, progress=False)
        secs = time.time() - t
        ppl = perplexity(sparse_model(model, plan), ev)
        density = _density(plan)
        rows.append({"recipe": name, "ppl": ppl, "delta": ppl / dense - 1, "seconds": secs, "density": density})
        print(f"{name:<26}{ppl:9.3f}{ppl / dense - 1:+10.1%}{density:9.3f}{secs:9.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"windows": a.windows, "length": a.length, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
