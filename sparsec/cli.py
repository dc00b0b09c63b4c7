"""The ``sparsec`` command line.

    sparsec passes | recipes
    sparsec calibrate --model smollm2-135m --recipe teal-40 --out smollm2.sparsec
    sparsec report smollm2.sparsec [--json] [--plot sparsity.png]
    sparsec eval --model smollm2-135m --recipe teal-40 [--plan FILE] [--windows N] [--json]
    sparsec export-onnx --model smollm2-135m --plan smollm2.sparsec --out smollm2.onnx [--nm-format dense]
    sparsec export-mlir --model tiny-llama --plan tiny.sparsec --out tiny.mlir
    sparsec demo
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["main"]


def _setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _first_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    if not doc and hasattr(obj, "__class__"):
        doc = (type(obj).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def cmd_passes(a) -> int:
    from .plugins import get_registry

    reg = get_registry()
    rows = [(n, reg.pass_plugin[n], ", ".join(getattr(p, "after", ()) or ()) or "-",
             ", ".join(getattr(p, "before", ()) or ()) or "-", _first_line(sys.modules[type(p).__module__]))
            for n, p in sorted(reg.passes.items())]
    _table(["pass", "plugin", "after", "before", "what it rewrites"], rows)
    return 0


def cmd_recipes(a) -> int:
    from .plugins import get_registry

    reg = get_registry()
    _table(["recipe", "plugin", "description"], [(r.name, r.plugin, r.description) for r in sorted(reg.recipes.values(), key=lambda r: r.name)])
    return 0


def _table(header, rows) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(header)))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


def _load(name: str):
    from .errors import SparsecError
    from .models.llama import load_model

    model, tok = load_model(name)
    if tok is None:
        raise SparsecError(f"model {name!r} has no tokenizer files; these commands need one to make token ids")
    return model, tok


def _check_output(path: str, what: str, *, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done; the message names
    the path and the reason. ``folder``: the output is a folder, created with its parents."""
    from .errors import SparsecError

    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise SparsecError(f"cannot write {what} to {path!r}: a file of that name exists ({what} is a folder)")
    if not folder and p.is_dir():
        raise SparsecError(f"cannot write {what} to {path!r}: it is a directory; give a file name")
    probe = p if folder else (p.parent if str(p.parent) else Path("."))
    if folder:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    elif not probe.exists():
        raise SparsecError(f"cannot write {what} to {path!r}: directory {str(probe)!r} does not exist")
    if not probe.is_dir():
        raise SparsecError(f"cannot write {what} to {path!r}: {str(probe)!r} is not a directory")
    if p.exists() and not p.is_dir() and not os.access(p, os.W_OK):
        raise SparsecError(f"cannot write {what} to {path!r}: the file is read-only")
    try:  # permissions, read-only file systems, /proc ...: ask the file system itself
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise SparsecError(f"cannot write {what} to {path!r}: directory {str(probe)!r} is not writable "
                           f"({exc.strerror or exc})") from None


def _check_recipe(recipe) -> None:
    """Resolve the recipe before loading a model: a typo fails in a second, not after it."""
    from .recipes import resolve_recipe

    resolve_recipe(recipe)


def cmd_calibrate(a) -> int:
    import sparsec
    from .models.data import calibration_windows

    _check_output(a.out, "the plan", folder=True)  # before the model loads and calibration runs
    _check_recipe(a.recipe)
    model, tok = _load(a.model)
    batches = calibration_windows(tok, a.windows, a.length, batch=a.batch)
    plan = sparsec.calibrate(model, batches, a.recipe)
    plan.save(a.out)
    print(sparsec.report(plan))
    print(f"plan saved to {a.out}")
    return 0


def cmd_report(a) -> int:
    import sparsec

    rep = sparsec.report(sparsec.Plan.load(a.plan))
    if a.plot:
        _check_output(a.plot, "the plot", folder=False)  # before the report is printed
    print(rep.to_json() if a.json else rep)
    if a.plot:
        print(f"plot written to {rep.plot(a.plot)}", file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    import sparsec
    from .evaluate import evaluate_recipe

    plan = sparsec.Plan.load(a.plan) if a.plan else None  # a bad plan fails before the model loads
    if plan is None:
        _check_recipe(a.recipe)
    model, tok = _load(a.model)
    # evaluate_recipe runs the sparse model first: a plan made for another model fails on its
    # first window, not after the whole dense perplexity
    res = evaluate_recipe(model, tok, a.recipe, plan=plan, windows=a.windows, window_length=a.length, progress=not a.json)
    if a.json:
        print(json.dumps({"model": a.model, **res.to_dict()}))
    else:
        print(f"model {a.model}, recipe {res.recipe}: {res.windows} evaluation windows of {res.window_length} tokens")
        print(f"  dense  perplexity {res.dense_ppl:8.3f}")
        print(f"  sparse perplexity {res.sparse_ppl:8.3f}  ({res.delta:+.1%})")
    return 0


def cmd_export_onnx(a) -> int:
    import sparsec
    from .errors import SparsecError
    from .models.data import evaluation_windows
    from .onnx_export import _check_path

    if not a.plan and not a.recipe:
        raise SparsecError("export-onnx needs --plan FILE or --recipe NAME")
    if a.plan and a.recipe:
        raise SparsecError("export-onnx: give --plan or --recipe, not both (a plan carries its recipe)")
    _check_path(a.out)  # before the model loads
    plan = sparsec.Plan.load(a.plan) if a.plan else None
    if plan is None:
        _check_recipe(a.recipe)
    model, tok = _load(a.model)
    # two rows of --length tokens: torch.export keeps size-1 axes static, so batch and
    # sequence stay dynamic only with an example of at least 2 of each (--length >= 2)
    ids = evaluation_windows(tok, 1, a.length)[0].repeat(2, 1)
    if plan is None:
        from .models.data import calibration_windows

        plan = sparsec.calibrate(model, calibration_windows(tok, 8, 128, batch=4), a.recipe)
    path = sparsec.export_onnx(model, (ids,), a.out, plan=plan, nm_format=a.nm_format,
                               external_data=True if a.external_data else None)
    size = os.path.getsize(path) + (os.path.getsize(str(path) + ".data") if os.path.exists(str(path) + ".data") else 0)
    print(f"wrote {path} ({size / 1e6:.1f} MB; N:M weights {a.nm_format}; checked with onnx.checker full_check)")
    return 0


def cmd_export_mlir(a) -> int:
    import sparsec
    from .models.data import evaluation_windows

    _check_output(a.out, "the MLIR", folder=False)
    plan = sparsec.Plan.load(a.plan)  # before the model loads
    model, tok = _load(a.model)
    ids = evaluation_windows(tok, 1, a.length)[0]
    module = sparsec.export_mlir(model, (ids,), plan=plan, path=a.out)
    n_sparse = str(module).count("sparse_tensor.convert")
    print(f"wrote {a.out} (linalg on tensors, input [1, {a.length}] tokens; {n_sparse} N:M weights with a "
          "structured sparse encoding)")
    return 0


def cmd_demo(a) -> int:
    import torch

    import sparsec
    from .evaluate import perplexity
    from .models.data import calibration_windows, evaluation_windows
    from .models.llama import smollm2

    _check_output(a.plan_out, "the demo's plan", folder=True)  # before minutes of work
    if a.plot:
        _check_output(a.plot, "the demo's plot", folder=False)
    torch.manual_seed(0)
    t0 = time.time()
    print("== sparsec demo: SmolLM2-135M, TEAL 40% with greedy allocation ==", flush=True)
    model, tok = smollm2()
    print(f"[{time.time() - t0:5.0f}s] model loaded ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)

    # 14 windows for the histograms, the last 2 held out to score the greedy steps (256 tokens
    # keep the greedy search near a minute here; 512 gave the same allocation quality)
    plan = sparsec.calibrate(model, calibration_windows(tok, 16, 128, batch=2), "teal-40")
    plan.save(a.plan_out)
    print(f"[{time.time() - t0:5.0f}s] calibrated; plan saved to {a.plan_out}", flush=True)

    # The evaluation windows share one length: one static compile serves them all.
    compiled = torch.compile(model, backend="sparsec", options={"plan": plan})
    ev = evaluation_windows(tok, a.windows, a.length)
    with torch.inference_mode():
        dense_ppl = perplexity(model, ev, progress=True, desc="dense perplexity")
        sparse_ppl = perplexity(compiled, ev, progress=True, desc="sparsec perplexity (compiles first)")
    print(f"[{time.time() - t0:5.0f}s] compiled with backend='sparsec' and evaluated\n", flush=True)
    print(sparsec.report(compiled))
    if a.plot and importlib.util.find_spec("matplotlib") is None:
        print("(no per-site plot: matplotlib is not installed; pip install 'sparsec[plot]')")
    elif a.plot:
        sparsec.report(compiled).plot(a.plot)
        print(f"per-site sparsity plot: {a.plot}")
    print(f"\nperplexity on {len(ev)} evaluation windows of {a.length} tokens (pydoc text, second half):")
    print(f"  dense   {dense_ppl:8.3f}")
    print(f"  sparsec {sparse_ppl:8.3f}  ({sparse_ppl / dense_ppl - 1:+.1%})\n")

    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    # Generation grows the sequence every step: the exported program with a dynamic sequence
    # axis runs every length without recompiling (sparsec.export, the second entry point).
    seq = torch.export.Dim("seq", min=2, max=1024)
    exported = sparsec.export(model, (ids,), plan=plan, dynamic_shapes=({1: seq},)).module()
    print(f"[{time.time() - t0:5.0f}s] exported with sparsec.export (dynamic sequence length)")
    for label, fn in (("dense  ", model), ("sparsec", exported)):
        out = ids
        with torch.inference_mode():
            for _ in range(a.tokens):
                nxt = fn(out).logits[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, nxt], 1)
        print(f"{label}: {tok.decode(out[0])!r}")
    print(f"\ndone in {time.time() - t0:.0f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparsec", description="sparsec: a plugin-based sparsity compiler for PyTorch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("passes", help="list the registered passes").set_defaults(fn=cmd_passes)
    sub.add_parser("recipes", help="list the named recipes").set_defaults(fn=cmd_recipes)

    p = sub.add_parser("calibrate", help="calibrate a plan on the calibration windows")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, or a local HF folder")
    p.add_argument("--recipe", default="teal-40")
    p.add_argument("--out", required=True, help="plan folder to write")
    p.add_argument("--windows", type=_positive, default=16)
    p.add_argument("--length", type=_positive, default=128)
    p.add_argument("--batch", type=_positive, default=4)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("report", help="print what a plan rewrites")
    p.add_argument("plan")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="also write a PNG of per-site sparsity")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("eval", help="perplexity of the dense and the sparse model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="teal-40")
    p.add_argument("--plan", default=None)
    p.add_argument("--windows", type=_positive, default=8)
    p.add_argument("--length", type=_positive, default=512)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export-onnx", help="export the sparse model to ONNX (runs in onnxruntime)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, or a local HF folder")
    p.add_argument("--plan", default=None, help="a calibrated plan (sparsec calibrate)")
    p.add_argument("--recipe", default=None, help="calibrate this recipe first when no --plan is given")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--nm-format", choices=["compressed", "dense"], default="compressed",
                   help="N:M weights as values + packed positions (default) or dense with zeros")
    p.add_argument("--external-data", action="store_true", help="weights in <out>.data (automatic above ~1.8 GiB)")
    p.add_argument("--length", type=_at_least_2, default=16,
                   help="tokens in the example input, at least 2 (batch and sequence axes stay dynamic)")
    p.set_defaults(fn=cmd_export_onnx)

    p = sub.add_parser("export-mlir", help="write the sparse model as MLIR (linalg on tensors, torch-mlir)")
    p.add_argument("--model", default="tiny-llama", help="smollm2-135m, tiny-llama, or a local HF folder")
    p.add_argument("--plan", required=True, help="a calibrated plan (sparsec calibrate)")
    p.add_argument("--out", required=True, help="the .mlir file to write")
    p.add_argument("--length", type=_positive, default=16, help="tokens in the (static) input")
    p.set_defaults(fn=cmd_export_mlir)

    p = sub.add_parser("demo", help="SmolLM2 with TEAL 40%%: calibrate, compile, report, perplexity, generate")
    p.add_argument("--windows", type=_positive, default=4)
    p.add_argument("--length", type=_positive, default=512)
    p.add_argument("--tokens", type=_positive, default=12)
    p.add_argument("--plan-out", default=os.path.join(_cache_root(), "demo-teal-40.sparsec"),
                   help="where the demo saves its plan (default: $SPARSEC_CACHE/demo-teal-40.sparsec, "
                        "SPARSEC_CACHE defaulting to ~/.cache/sparsec)")
    p.add_argument("--plot", default="sparsec-demo-sparsity.png")
    p.set_defaults(fn=cmd_demo)
    return ap


def _cache_root() -> str:
    """``$SPARSEC_CACHE``, default ``~/.cache/sparsec`` (as for the kernels and the models)."""
    return os.environ.get("SPARSEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsec")


def _whole(text: str, least: int, why: str = "") -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {v}{why}")
    return v


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (0 windows or tokens would divide by zero)."""
    return _whole(text, 1)


def _at_least_2(text: str) -> int:
    """argparse type for export-onnx --length: torch.export fixes a size-1 axis, so a 1-token
    example would silently export a fixed sequence length."""
    return _whole(text, 2, " (with 1 token the exported sequence axis would be fixed, not dynamic)")


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from .errors import SparsecError

    _setup()
    a = build_parser().parse_args(argv)
    user_errors = (SparsecError, ValueError, OSError)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return a.fn(a) or 0
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # torch.compile wraps what the backend raised (a PlanError, say) in its own
        # BackendCompilerFailed, with the full compile traceback: report the cause
        cause = getattr(exc, "inner_exception", None)
        err = cause if isinstance(cause, user_errors) else exc
        if os.environ.get("SPARSEC_TRACEBACK") == "1":
            raise
        if isinstance(err, user_errors):
            print(f"sparsec: error: {_one_line(err)}", file=sys.stderr)
        else:  # a bug: still one line; SPARSEC_TRACEBACK=1 shows where
            print(f"sparsec: internal error: {type(err).__name__}: {_one_line(err)} "
                  "(SPARSEC_TRACEBACK=1 shows the traceback; please report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
