"""Activation-sparse linear (sparsec's C++ kernel) vs ``F.linear``, cold weights.

    python bench/kernels.py [--threads 1] [--reps 25] [--quick] [--json out.json]
    python bench/kernels.py --nm [--n 2 --m 4] ...      (the N:M compressed linear instead)
    python bench/kernels.py --cats ...                  (the CATS fused MLP vs the dense MLP)
    python bench/kernels.py --rsparse [--density 0.5]   (R-Sparse: sparse rows + low rank)
    python bench/kernels.py --nm --dense-copy --batches 8 16 64   (as compiled models run it:
        calls where dense wins use a cached masked dense copy of the weight)

For each weight shape (out x in), dtype, batch and sparsity s: x ~ N(0, 1), the threshold is
the s-quantile of |x| (each row is s sparse; rows of a batch have independent masks, so a
batch reads the *union* of its rows' active channels). Both variants cycle through weight
copies totalling > 600 MiB so every call streams its weight from DRAM (the L3 is 300 MiB),
and run interleaved (dense, sparse, dense, sparse, ...) in one process; medians are quoted.

Columns: ``speedup`` = median F.linear time / median sparse time; ``ideal`` = 1 / (1 - s_read)
where s_read is the fraction of weight rows the kernel skips (= s at batch 1); ``% ideal``.
With ``--nm``: ``ideal`` = dense bytes / compressed bytes (values + packed positions).
"""

from __future__ import annotations

if __name__ == "kernels":
    # imported, not run: `python bench/<script>.py` puts bench/ first on sys.path, so an `import
    # kernels` (transformers >= 5.25 imports Hugging Face's package of that name on load) found
    # this script. Step aside: take bench/ off the path and hand the name to the real package
    # (the importer gets what sys.modules holds once this file has run; the rest of it only
    # defines functions).
    import importlib
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from sparsec.kernels import activation, cpu

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = [1, 4, 16]
SPARSITIES = [0.0, 0.5, 0.7, 0.9]
COLD_BYTES = 640 << 20


def copies(w: torch.Tensor, transpose: bool) -> list[torch.Tensor]:
    """Distinct copies of ``w`` (``transpose``: of ``W^T``, the kernel's prepared layout, in
    huge-page memory as ``sparsec.codegen.lower`` allocates it for a compiled model)."""
    n = max(2, -(-COLD_BYTES // (w.numel() * w.element_size())))
    src = w.t().contiguous() if transpose else w
    out = []
    for _ in range(n):
        c = cpu.empty_huge(tuple(src.shape), src.dtype) if transpose else torch.empty_like(src)
        c.copy_(src)  # distinct storage per copy
        out.append(c)
    return out


def interleaved(dense, sparse, reps: int) -> tuple[float, float]:
    """Median seconds of ``dense(i)`` and ``sparse(i)``, called in turn (i counts every call,
    so consecutive calls pick different weight copies); two warm-up rounds are dropped."""
    times = ([], [])
    i = 0
    for r in range(reps + 2):
        for which, fn in enumerate((dense, sparse)):
            i += 1
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            if r >= 2:
                times[which].append(dt)
    return statistics.median(times[0]), statistics.median(times[1])


def timing_columns(row: dict, sparse_key: str, d: float, sp: float, ideal: float) -> str:
    """Add the timing columns every table here ends with to ``row`` (both times in ms, the
    speedup, the ideal, the % of it) and return them formatted."""
    row.update({"dense_ms": d * 1e3, sparse_key: sp * 1e3, "speedup": d / sp, "ideal": ideal,
                "pct_ideal": 100 * d / sp / ideal})
    return f"{d * 1e3:>9.3f} {sp * 1e3:>9.3f} {d / sp:>7.2f}x {ideal:>5.2f}x {100 * d / sp / ideal:>6.0f}%"


def bench_cell(ext, ws, wts, x, t, reps):
    # the kernel gets the original weight too, as compiled graphs pass it (for its dense path)
    return interleaved(lambda i: F.linear(x, ws[i % len(ws)]),
                       lambda i: ext.sparse_linear(x, wts[i % len(wts)], None, t, ws[i % len(ws)]), reps)


def bench_nm(a) -> list[dict]:
    from sparsec.kernels import nm

    rows = []
    print(f"{'shape (out x in)':>18} {'dtype':>5} {'batch':>5} {'pattern':>7} {'dense ms':>9} {'nm ms':>9} "
          f"{'speedup':>8} {'ideal':>6} {'% ideal':>7}")
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES[:1] if a.quick else SHAPES
    batches = a.batches or ([1] if a.quick else BATCHES)
    for (n_out, k_in) in shapes:
        for dname, dtype in DTYPES.items():
            w = (torch.randn(n_out, k_in, generator=g) / k_in**0.5).to(dtype)
            keep = nm.nm_mask(w.abs(), a.n, a.m)
            v, p = nm.pack(w, keep, a.n, a.m)
            ws = copies(w, False)
            nc = max(2, -(-COLD_BYTES // (v.numel() * v.element_size())))
            packs = [(v.clone(), p.clone()) for _ in range(nc)]
            ideal = (w.numel() * w.element_size()) / (v.numel() * v.element_size() + p.numel())
            for b in batches:
                x = torch.randn(b, k_in, generator=g).to(dtype)
                got = torch.ops.sparsec.nm_linear(x, v, p, None, a.n, a.m, -1.0, a.dense_copy)
                ref = F.linear(x, w * keep)
                tol = 1e-3 if dtype == torch.float32 else 3e-2
                assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (n_out, k_in, dname, b)
                if a.dense_copy:  # each copy's first call makes its dense weight: not what is timed
                    for vv, pp in packs:
                        torch.ops.sparsec.nm_linear(x, vv, pp, None, a.n, a.m, -1.0, True)

                def nm_call(i):
                    vv, pp = packs[i % nc]
                    return torch.ops.sparsec.nm_linear(x, vv, pp, None, a.n, a.m, -1.0, a.dense_copy)

                d, sp = interleaved(lambda i: F.linear(x, ws[i % len(ws)]), nm_call, a.reps)
                rows.append(dict(shape=f"{n_out}x{k_in}", dtype=dname, batch=b, pattern=f"{a.n}:{a.m}"))
                cols = timing_columns(rows[-1], "nm_ms", d, sp, ideal)
                print(f"{n_out:>8}x{k_in:<9} {dname:>5} {b:>5} {a.n}:{a.m:<5} {cols}", flush=True)
            del ws, packs
    return rows


CATS_SHAPES = [(4096, 11008), (576, 1536)]  # (hidden, intermediate): Llama-2-7B's MLP, SmolLM2's


def bench_cats(a) -> list[dict]:
    """The CATS fused MLP (``sparsec::sparse_cats_mlp``: dense gate, then only the active rows
    of up and of W_down^T) vs the dense SwiGLU MLP (three ``F.linear``). s is the fraction of
    |silu(gate x)| at or below the threshold; ideal = 3 / (1 + 2 (1 - s_read)): the gate is
    always read in full."""
    rows = []
    print(f"{'MLP (hidden x inter)':>21} {'dtype':>5} {'batch':>5} {'s':>4} {'s_read':>6} {'dense ms':>9} "
          f"{'cats ms':>9} {'speedup':>8} {'ideal':>6} {'% ideal':>7}")
    g = torch.Generator().manual_seed(0)
    shapes = CATS_SHAPES[:1] if a.quick else CATS_SHAPES
    batches = a.batches or ([1] if a.quick else [1, 4])
    for (h, inter) in shapes:
        for dname, dtype in DTYPES.items():
            wg, wu = [(torch.randn(inter, h, generator=g) / h**0.5).to(dtype) for _ in range(2)]
            wd = (torch.randn(h, inter, generator=g) / inter**0.5).to(dtype)
            n = max(2, -(-COLD_BYTES // (3 * wg.numel() * wg.element_size())))
            dense_sets = [(wg.clone(), wu.clone(), wd.clone()) for _ in range(n)]
            # W_down^T in huge-page memory, as codegen.lower prepares it, and the original W_down
            # (the compiled op gets both: its dense paths multiply by the original)
            cats_sets = [(wg.clone(), wu.clone(), cpu.empty_huge((inter, h), dtype).copy_(wd.t()), dense_sets[k][2])
                         for k in range(n)]
            for b in batches:
                x = torch.randn(b, h, generator=g).to(dtype)
                act = F.silu(F.linear(x, wg)).float().abs()
                for s in SPARSITIES:
                    t = float(torch.quantile(act.flatten(), s)) if s > 0 else -1.0
                    got = torch.ops.sparsec.sparse_cats_mlp(x, wg, None, wu, None, cats_sets[0][2], None, t, "silu",
                                                            None, wd)
                    ref = activation.cats_mlp_reference(x, wg, None, wu, None, wd, None, t, "silu")
                    tol = 1e-3 if dtype == torch.float32 else 3e-2
                    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (h, inter, dname, b, s)
                    s_read = 1.0 - (act > t).any(0).float().mean().item()

                    def dense_mlp(i):
                        g_, u_, d_ = dense_sets[i % n]
                        return F.linear(F.silu(F.linear(x, g_)) * F.linear(x, u_), d_)

                    def cats(i):
                        g_, u_, dt_, d_ = cats_sets[i % n]
                        return torch.ops.sparsec.sparse_cats_mlp(x, g_, None, u_, None, dt_, None, t, "silu", None, d_)

                    d, sp = interleaved(dense_mlp, cats, a.reps)
                    ideal = 3.0 / (1.0 + 2.0 * (1.0 - s_read))
                    rows.append(dict(shape=f"{h}x{inter}", dtype=dname, batch=b, s=s, s_read=round(s_read, 4)))
                    cols = timing_columns(rows[-1], "cats_ms", d, sp, ideal)
                    print(f"{h:>9}x{inter:<11} {dname:>5} {b:>5} {s:>4.1f} {s_read:>6.3f} {cols}", flush=True)
            del dense_sets, cats_sets
    return rows


RSPARSE_ALPHAS = [1.0, 0.75, 0.5]


def bench_rsparse(a) -> list[dict]:
    """The R-Sparse op (``sparsec::rsparse_linear_t``: active rows of W^T, the complement's rows
    of v, all rows of us) vs ``F.linear``, at bytes density ``--density`` (default 0.5) with
    ``alpha`` of the budget on sparse channels (k = alpha d in, rank from the rest). Scores
    ``|x| ||W[:, i]||`` of x ~ N(0, 1); the threshold leaves k channels active at batch 1.
    ideal = dense bytes / bytes the kernel reads (k out + (in - k_read) r + r out; the budget's
    count, r (in + out), is an upper bound); ``1/d`` is the issue's target scale."""
    from sparsec.kernels import rsparse
    from sparsec.passes.rsparse.search import rank_for

    d = a.density
    rows = []
    print(f"{'shape (out x in)':>18} {'dtype':>5} {'batch':>5} {'alpha':>5} {'k':>6} {'rank':>5} {'dense ms':>9} "
          f"{'rsparse ms':>10} {'speedup':>8} {'ideal':>6} {'% ideal':>7} {'x 1/d':>6}")
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES[:1] if a.quick else SHAPES[:2]
    batches = a.batches or ([1] if a.quick else [1, 4, 16])
    for (n_out, k_in) in shapes:
        for dname, dtype in DTYPES.items():
            w = (torch.randn(n_out, k_in, generator=g) / k_in**0.5).to(dtype)
            scale = w.float().norm(dim=0)
            ws, wts = copies(w, False), copies(w, True)
            for alpha in RSPARSE_ALPHAS:
                k = int(alpha * d * k_in)
                r = rank_for(k_in, n_out, d, k)
                v = (torch.randn(k_in, r, generator=g) / k_in**0.5).to(dtype)
                us = torch.randn(r, n_out, generator=g).to(dtype)
                nf = max(2, -(-COLD_BYTES // max(1, (v.numel() + us.numel()) * v.element_size())))
                factors = [(v.clone(), us.clone()) for _ in range(min(nf, len(wts)))]
                for b in batches:
                    x = torch.randn(b, k_in, generator=g).to(dtype)
                    score = x.float().abs() * scale
                    t = float(torch.quantile(score.flatten(), 1 - k / k_in)) if 0 < k < k_in else (
                        -1.0 if k >= k_in else 3.4e38)
                    got = torch.ops.sparsec.rsparse_linear_t(x, wts[0], None, scale, v, us, t, ws[0])
                    ref = rsparse.rsparse_linear_t_reference(x, wts[0], None, scale, v, us, t)
                    tol = 1e-3 if dtype == torch.float32 else 3e-2
                    assert torch.allclose(got.float(), ref.float(), atol=tol * float(ref.abs().max()), rtol=tol)
                    m = ~(score <= t)
                    k_read = int(m.any(0).sum())
                    inact = int((~m).any(0).sum())
                    read = k_read * n_out + inact * r + r * n_out

                    def rs(i):
                        vv, uu = factors[i % len(factors)]
                        return torch.ops.sparsec.rsparse_linear_t(x, wts[i % len(wts)], None, scale, vv, uu, t,
                                                                   ws[i % len(ws)])

                    dn, sp = interleaved(lambda i: F.linear(x, ws[i % len(ws)]), rs, a.reps)
                    rows.append(dict(shape=f"{n_out}x{k_in}", dtype=dname, batch=b, alpha=alpha, k=k, rank=r,
                                     density=d))
                    cols = timing_columns(rows[-1], "rsparse_ms", dn, sp, k_in * n_out / read)
                    rows[-1]["of_1_over_d"] = dn / sp * d
                    print(f"{n_out:>8}x{k_in:<9} {dname:>5} {b:>5} {alpha:>5.2f} {k:>6} {r:>5} {cols} "
                          f"{dn / sp * d:>5.2f}", flush=True)
                del factors
            del ws, wts
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="first shape, batch 1 only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--nm", action="store_true", help="benchmark the N:M compressed linear")
    ap.add_argument("--cats", action="store_true", help="benchmark the CATS fused MLP (batches 1 and 4)")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="only these batch sizes")
    ap.add_argument("--dtypes", nargs="*", default=None, choices=list(DTYPES), help="only these dtypes")
    ap.add_argument("--shapes", nargs="*", default=None, metavar="OUTxIN",
                    help="weight shapes instead of the defaults, e.g. 960x576 576x1536 (SmolLM2's)")
    ap.add_argument("--dense-copy", action="store_true",
                    help="--nm: let calls where dense wins use a cached dense copy (the pass's default)")
    ap.add_argument("--rsparse", action="store_true", help="benchmark the R-Sparse op (sparse rows + low rank)")
    ap.add_argument("--density", type=float, default=0.5, help="--rsparse: bytes density")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--m", type=int, default=4)
    a = ap.parse_args()
    if a.shapes:
        SHAPES[:] = [tuple(int(v) for v in sh.lower().split("x")) for sh in a.shapes]
    if a.dtypes:
        for d in list(DTYPES):
            if d not in a.dtypes:
                del DTYPES[d]
    torch.set_num_threads(a.threads)
    ext = cpu.extension()
    info = cpu.build_info()
    print(f"# sparsec C++ kernels: {info}; threads={a.threads}; reps={a.reps}; torch {torch.__version__}")
    if a.cats or a.nm or a.rsparse:
        rows = bench_cats(a) if a.cats else bench_nm(a) if a.nm else bench_rsparse(a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"build": info, "threads": a.threads, "rows": rows}, f, indent=1)
        return
    shapes = SHAPES[:1] if a.quick else SHAPES
    batches = a.batches or ([1] if a.quick else BATCHES)
    rows = []
    print(f"{'shape (out x in)':>18} {'dtype':>5} {'batch':>5} {'s':>4} {'s_read':>6} {'dense ms':>9} "
          f"{'sparse ms':>9} {'speedup':>8} {'ideal':>6} {'% ideal':>7} {'dense GB/s':>10}")
    g = torch.Generator().manual_seed(0)
    for (n_out, k_in) in shapes:
        for dname, dtype in DTYPES.items():
            w = (torch.randn(n_out, k_in, generator=g) / k_in**0.5).to(dtype)
            ws, wts = copies(w, False), copies(w, True)
            for b in batches:
                x = torch.randn(b, k_in, generator=g).to(dtype)
                for s in SPARSITIES:
                    t = float(torch.quantile(x.float().abs().flatten()[:1 << 24], s)) if s > 0 else -1.0
                    # exactness check on this cell before timing it
                    ref = activation.sparse_linear_reference(x, wts[0], None, t)
                    got = ext.sparse_linear(x, wts[0], None, t)
                    tol = 1e-3 if dtype == torch.float32 else 3e-2
                    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (n_out, k_in, dname, b, s)
                    act = ~(x.float().abs() <= t)
                    s_read = 1.0 - act.any(0).float().mean().item()
                    d, sp = bench_cell(ext, ws, wts, x, t, a.reps)
                    gbs = w.numel() * w.element_size() / d / 1e9
                    rows.append(dict(shape=f"{n_out}x{k_in}", dtype=dname, batch=b, s=s, s_read=round(s_read, 4)))
                    cols = timing_columns(rows[-1], "sparse_ms", d, sp, 1.0 / (1.0 - s_read))
                    rows[-1]["dense_gbs"] = gbs
                    print(f"{n_out:>8}x{k_in:<9} {dname:>5} {b:>5} {s:>4.1f} {s_read:>6.3f} {cols} {gbs:>10.1f}",
                          flush=True)
            del ws, wts
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"build": info, "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
