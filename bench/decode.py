"""SmolLM2-135M greedy decode, batch 1: tokens/s of eager dense, Inductor dense and sparsec.

    python bench/decode.py [--threads 1] [--tokens 32] [--rounds 5] [--recipes teal-40 teal-50]
                           [--ppl-windows 4] [--dtype float32] [--skip-module-guards] [--json out.json]

Every variant compiles one decode step (``fullgraph=True``: a graph break is an error) on its
own ``StaticCache``; the prompt is prefilled eagerly and not timed. Rounds interleave the
variants (A B C D, A B C D, ...); each round decodes ``--tokens`` tokens; the table quotes
the median tokens/s over rounds and the ratio to Inductor dense from the same run, and the
lowest and highest ratio within one round (``each round``). The model
is 540 MB (fp32), above the 300 MiB L3, so every step streams its weights from DRAM.

Perplexity: the same plan on the evaluation windows (``--ppl-windows`` x 512 tokens).
Compile time: wall time of the first decode step of each compiled variant, all of them cold:
Inductor's caches live in a fresh folder for the run (a graph compiled by an earlier run would
otherwise load in a quarter of the time), warmed by one toy compile first so that no variant
pays Inductor's one-off setup. ``--warm-cache`` keeps the usual cache folder.

``--dtype bfloat16`` runs the model in bf16 (the issue's table is fp32). ``--skip-module-guards``
compiles every variant with ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: dynamo then
stops re-checking the model's modules before each step (3.2 -> 0.8 ms per SmolLM2 step here),
which is safe only while nobody swaps the model's modules or parameters between steps.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import sparsec
from sparsec.evaluate import perplexity, sparse_model
from sparsec.models.data import calibration_windows, evaluation_windows
from sparsec.models.llama import smollm2


def make_step(model, backend, options, max_len):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)

    def step(ids, pos):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits

    fn = step if backend is None else torch.compile(step, backend=backend, options=options, fullgraph=True)
    return cache, fn


@torch.no_grad()
def decode(model, cache, fn, prompt, tokens):
    cache.reset()
    n = prompt.shape[1]
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(n), use_cache=True).logits
    tok = int(logits[0, -1].argmax())
    out = [tok]
    t0 = time.perf_counter()
    for i in range(tokens):
        # a fresh [1, 1] tensor each step: same strides every call, no recompiles
        logits = fn(torch.tensor([[tok]]), torch.tensor([n + i]))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recipes", nargs="*", default=["teal-40", "teal-50"])
    ap.add_argument("--ppl-windows", type=int, default=4, help="0: skip perplexity")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plans", default=None, help="folder to reuse calibrated plans from (and save them to)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--warm-cache", action="store_true", help="reuse Inductor's cache (compile times then vary)")
    ap.add_argument("--skip-module-guards", action="store_true",
                    help="every compiled variant: torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    if not a.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsec-decode-inductor-")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
        torch.compile(lambda t: (t * 2).relu())(torch.ones(4))  # Inductor's one-off setup, outside the timings
    model, tok = smollm2(getattr(torch, a.dtype))
    prompt = tok("The Python standard library provides", return_tensors="pt").input_ids
    max_len = prompt.shape[1] + a.tokens + 8
    ev = evaluation_windows(tok, a.ppl_windows, 512) if a.ppl_windows > 0 else []  # 0: speed only
    calib = calibration_windows(tok, 16, 128, batch=4)

    extra = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if a.skip_module_guards else {}
    variants = {"eager dense": (None, None, None), "inductor dense": ("inductor", extra or None, None)}
    for r in a.recipes:
        t0 = time.time()
        saved = Path(a.plans) / f"{r}.sparsec" if a.plans else None
        if saved is not None and saved.exists():
            plan = sparsec.Plan.load(saved)
        else:
            plan = sparsec.calibrate(model, calib, r, progress=True)
            print(f"# calibrated {r} in {time.time() - t0:.0f} s", flush=True)
            if saved is not None:
                plan.save(saved)
        variants[f"sparsec {r}"] = ("sparsec", {"plan": plan, **extra}, plan)

    steps, compile_s = {}, {}
    for name, (backend, options, _) in variants.items():
        cache, fn = make_step(model, backend, options, max_len)
        t0 = time.perf_counter()
        decode(model, cache, fn, prompt, 1)  # first call compiles
        compile_s[name] = time.perf_counter() - t0
        steps[name] = (cache, fn)
        print(f"# {name}: first step (compile) {compile_s[name]:.1f} s", flush=True)

    times = {n: [] for n in variants}
    texts = {}
    for _ in range(a.rounds):
        for name, (cache, fn) in steps.items():
            dt, out = decode(model, cache, fn, prompt, a.tokens)
            times[name].append(a.tokens / dt)
            texts[name] = out

    nan = float("nan")
    ppl = {"eager dense": perplexity(model, ev) if ev else nan}
    ppl["inductor dense"] = ppl["eager dense"]
    for name, (_, _, plan) in variants.items():
        ppl.setdefault(name, nan)
        if plan is not None and ev:
            torch._dynamo.reset()
            ppl[name] = perplexity(sparse_model(model, plan), ev)

    base = statistics.median(times["inductor dense"])
    guards = ", module guards skipped" if a.skip_module_guards else ""
    print(f"\nSmolLM2-135M {a.dtype} decode, batch 1, {a.threads} thread(s), {a.tokens} tokens x {a.rounds} rounds "
          f"(median){guards}, perplexity on {len(ev)} x 512 evaluation tokens")
    print(f"{'variant':<18} {'tok/s':>7} {'vs inductor':>11} {'each round':>11} {'compile s':>9} {'ppl':>8} "
          f"{'ppl vs dense':>12}")
    rows = []
    for name in variants:
        tps = statistics.median(times[name])
        d = ppl[name] / ppl["eager dense"] - 1
        # the variants run in turn within a round, so a round's ratio shares its machine state
        per_round = [v / b for v, b in zip(times[name], times["inductor dense"])]
        rows.append(dict(variant=name, tokens_per_s=tps, ratio=tps / base, round_ratios=per_round,
                         compile_s=compile_s.get(name, 0.0), ppl=ppl[name], ppl_delta=d, all_tokens_per_s=times[name]))
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
        print(f"{name:<18} {tps:>7.2f} {tps / base:>10.2f}x {spread:>11} {compile_s.get(name, 0.0):>9.1f} "
              f"{ppl[name]:>8.3f} {100 * d:>+11.1f}%")
    for name, out in texts.items():
        print(f"{name:<18} {tok.decode(out)!r}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "tokens": a.tokens, "dtype": a.dtype,
                       "skip_module_guards": a.skip_module_guards, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
