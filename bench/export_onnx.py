"""SmolLM2-135M exported to ONNX: file sizes, onnxruntime latency and agreement with sparsec.

    python bench/export_onnx.py [--threads 1] [--rounds 7] [--recipes teal-40 cats-50 magnitude-24 ...]
                         [--plans DIR] [--out DIR] [--json out.json]

For each variant: the ``.onnx`` file size, one 128-token forward (batch 1) in onnxruntime on
the CPU (median of ``--rounds`` interleaved rounds, ``--threads`` intra-op threads, ratio to
the dense export from the same run), the largest relative difference of the logits to
sparsec's own torch output (``sparsec.export`` then ``ep.module()``), and the perplexity of
that window from both. The dense row is a plain ``torch.onnx.export`` of the model. N:M
variants are exported both ways (``nm_format="compressed"`` and ``"dense"``).

"torch noise" is the same difference between two torch runs whose embeddings differ by a
relative 1e-7: thresholding is discontinuous, so an activation within rounding error of its
threshold flips, and the flip spreads to every later token. Two correct implementations
(onnxruntime and torch sum in different orders) differ by about that much, not by 1e-6.
``--reuse`` skips exports whose files already exist in ``--out``.

onnxruntime has no sparse kernels for these ops: the translations keep tensors dense, so
expect sparse exports to run at dense speed or a little slower (the threshold's
``Where(|x| <= t, 0, x)`` is one more pass over activations); the N:M saving is in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import sparsec
from sparsec.models.data import calibration_windows, evaluation_windows
from sparsec.models.llama import smollm2


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def perturbed(model, fn):
    """``fn()`` with the token embeddings scaled by (1 + 1e-7): a rounding-sized change."""
    h = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * (1 + 1e-7))
    try:
        return fn()
    finally:
        h.remove()


def window_ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(nll.exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--recipes", nargs="*", default=["teal-40", "cats-50", "magnitude-24", "sparsegpt-24-teal-40"])
    ap.add_argument("--plans", default=None, help="folder to reuse calibrated plans from (and save them to)")
    ap.add_argument("--out", default=None, help="folder for the .onnx files (default: a temporary one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep .onnx files already in --out")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    model, tok = smollm2()
    calib = calibration_windows(tok, 16, 128, batch=4)
    x = evaluation_windows(tok, 1, 128)[0]  # [1, 128]
    example = x.repeat(2, 1)  # 2 rows: torch.export keeps size-1 axes static
    out = Path(a.out or tempfile.mkdtemp(prefix="sparsec-onnx-"))
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, Path] = {}
    refs: dict[str, torch.Tensor] = {}
    noise: dict[str, float] = {}
    export_s: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if not (a.reuse and (out / "dense.onnx").exists()):
            torch.onnx.export(model, (example,), str(out / "dense.onnx"), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},),
                              output_names=["logits"], verbose=False)
            export_s["dense"] = time.perf_counter() - t0
        refs["dense"] = model(x).logits
        noise["dense"] = rel_err(perturbed(model, lambda: model(x).logits), refs["dense"])
    files["dense"] = out / "dense.onnx"
    for r in a.recipes:
        saved = Path(a.plans) / f"{r}.sparsec" if a.plans else None
        if saved is not None and saved.exists():
            plan = sparsec.Plan.load(saved)
        else:
            t0 = time.time()
            plan = sparsec.calibrate(model, calib, r, progress=True)
            print(f"# calibrated {r} in {time.time() - t0:.0f} s", flush=True)
            if saved is not None:
                plan.save(saved)
        has_nm = "nm_weights" in plan.recipe_obj().passes
        with torch.no_grad():
            ref = sparsec.export(model, (x,), plan=plan).module()(x).logits
            wobble = rel_err(perturbed(model, lambda: sparsec.export(model, (x,), plan=plan).module()(x).logits), ref)
        for fmt in ("compressed", "dense") if has_nm else ("compressed",):
            name = f"{r} ({fmt} N:M)" if has_nm else r
            t0 = time.perf_counter()
            path = out / f"{r}-{fmt}.onnx"
            if not (a.reuse and path.exists()):
                sparsec.export_onnx(model, (example,), path, plan=plan, nm_format=fmt)
                export_s[name] = time.perf_counter() - t0
            files[name], refs[name], noise[name] = path, ref, wobble

    sessions = {n: session(p, a.threads) for n, p in files.items()}
    feed = x.numpy()
    err, ppl, times = {}, {}, {n: [] for n in files}
    for n, s in sessions.items():
        got = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: feed})[0])
        err[n] = rel_err(got, refs[n])
        ppl[n] = (window_ppl(got, x), window_ppl(refs[n], x))
    for _ in range(a.rounds):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: feed})
            times[n].append(time.perf_counter() - t0)

    base = statistics.median(times["dense"])
    print(f"\nSmolLM2-135M fp32 in onnxruntime {__import__('onnxruntime').__version__} (CPU EP), one 128-token "
          f"forward, batch 1, {a.threads} thread(s), median of {a.rounds} interleaved rounds")
    print(f"{'export':<38} {'file MB':>8} {'vs dense':>8} {'ms':>7} {'vs dense':>8} {'rel err':>8} "
          f"{'torch noise':>11} {'ppl ORT':>8} {'ppl torch':>9} {'export s':>8}")
    rows = []
    dense_mb = os.path.getsize(files["dense"]) / 1e6
    for n, p in files.items():
        mb = os.path.getsize(p) / 1e6
        ms = 1e3 * statistics.median(times[n])
        es = export_s.get(n, float("nan"))
        rows.append(dict(export=n, file_mb=mb, ms=ms, ratio=base * 1e3 / ms, max_rel_err=err[n], torch_noise=noise[n],
                         ppl_ort=ppl[n][0], ppl_torch=ppl[n][1], export_s=es))
        print(f"{n:<38} {mb:>8.1f} {mb / dense_mb:>7.2f}x {ms:>7.1f} {ms / (base * 1e3):>7.2f}x {err[n]:>8.1e} "
              f"{noise[n]:>11.1e} {ppl[n][0]:>8.3f} {ppl[n][1]:>9.3f} {es:>8.1f}")
    print(f"(files in {out})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
