"""The Triton path on a CUDA machine: correctness against the reference, then speed vs cuBLAS.

    bash bench/gpu.sh            (installs nothing; run from the repository root)

1. Correctness: every generated kernel (sparse linear with/without bias and residual, CATS
   with each activation) on odd shapes, batch 1/3/16, bf16/fp16/fp32, vs the reference.
2. A compiled tiny Llama (``backend="sparsec"``, ``fullgraph=True``) on CUDA vs the reference,
   and Inductor's generated code launching sparsec's kernels itself (the ``triton_op`` twins).
3. Speed at batch 1 (bf16): sparse linear vs ``F.linear`` (cuBLAS) at s = 0, 0.5, 0.7, 0.9 on
   4096x4096, 11008x4096, 4096x11008; weights rotated through copies > 4x the L2;
   ``triton.testing.do_bench`` medians. Prints speedup and % of the ideal 1/(1-s).
4. N:M: the Triton GEMV (2:4, 4:8, 1:4; with and without a threshold) and the semi-structured
   route (2:4 at prefill sizes) against the masked-dense reference; then 2:4 bf16 speed vs
   cuBLAS on the dense masked weight from 1 to 4096 tokens: the Triton GEMV at <= 16 tokens,
   ``sparsec::nm_linear`` as routed, and the semi-structured GEMM forced, which gives the
   crossover ``kernels/nm.py::SEMI_STRUCTURED_MIN_TOKENS`` should hold.
5. R-Sparse: ``sparsec::rsparse_linear_t`` (the generated kernels at <= 16 tokens, the dense
   path above) on odd shapes, ranks 0 and odd, bf16/fp16/fp32, with bias and residual, all /
   none / half the channels active, vs the reference; then bf16 speed vs cuBLAS at 4096x4096,
   density 0.5, rank 512 (= 0.25 in out / (in + out)) at 1, 4 and 16 tokens: eager (the
   op as dispatched, Python included) and under a CUDA graph (the two launches alone), with
   the ideal speedup from the bytes read (``in out`` dense; ``k out + (in - k) r + r out``).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F


def main() -> int:
    assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA device"
    import triton

    from sparsec.kernels import activation as A
    from sparsec.kernels.activation import triton as AT

    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()} cc={torch.cuda.get_device_capability()} torch {torch.__version__} "
          f"triton {triton.__version__}", flush=True)
    fails = 0
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 4e-3}
    t0 = time.time()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (b, k, n) in [(1, 1000, 4099), (3, 576, 1536), (16, 1536, 576), (5, 4096, 11008)]:
            x = torch.randn(b, k, device=dev).to(dtype)
            wt = (torch.randn(k, n, device=dev) / k**0.5).to(dtype)
            bias = torch.randn(n, device=dev).to(dtype)
            res = torch.randn(b, n, device=dev).to(dtype)
            t = float(torch.quantile(x.float().abs().flatten(), 0.5))
            got = AT.sparse_linear_cuda(x, wt, bias, t, residual=res)
            ref = A.sparse_linear_reference(x, wt, bias, t) + res
            err = ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
            ok = err < tol[dtype]
            fails += not ok
            print(f"linear {str(dtype):15} b={b:<2} {k}x{n}: max rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
        for act in ("silu", "gelu", "gelu_tanh", "relu"):
            b, h, i = 3, 576, 1536
            x = torch.randn(b, h, device=dev).to(dtype)
            wg, wu = [(torch.randn(i, h, device=dev) / h**0.5).to(dtype) for _ in range(2)]
            wd = (torch.randn(h, i, device=dev) / i**0.5).to(dtype)
            a = A.ACTIVATIONS[act](F.linear(x, wg)).float().abs().flatten().sort().values
            t = float((a[len(a) // 2] + a[len(a) // 2 + 1]) / 2)
            got = AT.sparse_cats_mlp_cuda(x, wg, None, wu, None, wd.t().contiguous(), None, t, act)
            ref = A.cats_mlp_reference(x, wg, None, wu, None, wd, None, t, act)
            err = ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
            ok = err < 4 * tol[dtype]
            fails += not ok
            print(f"cats {act:10} {str(dtype):15}: max rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"# correctness in {time.time() - t0:.0f} s, {fails} failures", flush=True)

    # 2. compiled model on CUDA
    import warnings

    import sparsec
    from sparsec.models.llama import tiny_llama

    warnings.simplefilter("ignore")
    m = tiny_llama().to(dev)
    batches = [torch.randint(0, 256, (2, 24), device=dev) for _ in range(3)]
    plan = sparsec.calibrate(m, batches, "teal-50-uniform", progress=False)
    x = torch.randint(0, 256, (1, 7), device=dev)
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        ref = torch.compile(m, backend="sparsec", options={"plan": plan, "kernels": "reference",
                                                           "dense_backend": "eager"})(x).logits
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(m, backend="sparsec", options={"plan": plan}, fullgraph=True), x)
        out = out.logits
    err = (out - ref).abs().max().item()
    fails += not err < 1e-3
    print(f"tiny llama compiled on cuda (fullgraph): max err {err:.2e} {'ok' if err < 1e-3 else 'FAIL'}", flush=True)
    # the triton_op twins: Inductor's own code launches the generated kernels (no opaque op call)
    code = "\n".join(codes)
    inlined = "sparse_gemv" in code and "sparsec.triton_sparse_linear" not in code and "sparsec.sparse_linear" not in code
    fails += not inlined
    print(f"generated kernels inside Inductor's code (triton_op): {'ok' if inlined else 'FAIL'} "
          f"({code.count('sparse_gemv')} mentions of sparse_gemv)", flush=True)

    # 3. speed, batch 1, bf16
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"\n{'shape (out x in)':>16} {'s':>4} {'cuBLAS us':>9} {'sparse us':>9} {'speedup':>8} {'% ideal':>7}")
    for (n_out, k_in) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = (torch.randn(n_out, k_in, device=dev) / k_in**0.5).bfloat16()
        copies = max(4, -(-8 * l2 // (w.numel() * 2)))
        ws = [w.clone() for _ in range(copies)]
        wts = [w.t().contiguous() for _ in range(copies)]
        x = torch.randn(1, k_in, device=dev).bfloat16()
        for s in (0.0, 0.5, 0.7, 0.9):
            t = float(torch.quantile(x.float().abs().flatten(), s)) if s else -1.0
            it = {"d": 0, "s": 0}

            def dense():
                it["d"] += 1
                return F.linear(x, ws[it["d"] % copies])

            def sparse():
                it["s"] += 1
                return AT.sparse_linear_cuda(x, wts[it["s"] % copies], None, t)

            sparse()  # autotune outside the timing
            td = triton.testing.do_bench(dense, warmup=50, rep=300, return_mode="median")
            ts = triton.testing.do_bench(sparse, warmup=50, rep=300, return_mode="median")
            sp = td / ts
            ideal = 1 / (1 - s)
            rows.append(dict(shape=f"{n_out}x{k_in}", s=s, cublas_us=td * 1e3, sparse_us=ts * 1e3, speedup=sp,
                             pct_ideal=100 * sp / ideal))
            print(f"{n_out:>7}x{k_in:<8} {s:>4.1f} {td * 1e3:>9.1f} {ts * 1e3:>9.1f} {sp:>7.2f}x {100 * sp / ideal:>6.0f}%",
                  flush=True)
    nm_fails, nm_rows = nm_check(dev)
    fails += nm_fails
    rs_fails, rs_rows = rsparse_check(dev)
    fails += rs_fails
    with open(sys.argv[1] if len(sys.argv) > 1 else "gpu_bench.json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "failures": fails, "rows": rows, "nm_rows": nm_rows,
                   "rsparse_rows": rs_rows}, f, indent=1)
    return 1 if fails else 0


def nm_check(dev: str) -> tuple[int, list[dict]]:
    import triton

    from sparsec.kernels import nm
    from sparsec.kernels._triton import MAX_BATCH

    fails = 0
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 4e-3}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (n, m) in ((2, 4), (4, 8), (1, 4)):
            for (b, k, o) in [(1, 1000, 4099), (3, 576, 1536), (16, 1536, 576), (300, 4096, 4096)]:
                if k % m:
                    k = k // m * m
                x = torch.randn(b, k, device=dev).to(dtype)
                w = (torch.randn(o, k, device=dev) / k**0.5).to(dtype)
                v, p = nm.pack(w.cpu(), nm.nm_mask(w.abs().cpu(), n, m), n, m)
                v, p = v.to(dev), p.to(dev)
                bias = torch.randn(o, device=dev).to(dtype)
                for t in (-1.0, float(torch.quantile(x.float().abs().flatten()[:100000], 0.5))):
                    got = torch.ops.sparsec.nm_linear(x, v, p, bias, n, m, t)
                    ref = nm.nm_linear_reference(x, v, p, bias, n, m, t)
                    err = ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
                    route = nm.semi_structured_route(b, o, k, n, m, dtype, torch.cuda.get_device_capability(),
                                                     nm._available_semi_structured_backends())
                    ok = err < tol[dtype] * (4 if route else 1)
                    fails += not ok
                    print(f"nm {n}:{m} {str(dtype):15} b={b:<3} {k}x{o} t={t:.2f} via {route or 'triton/dense'}: "
                          f"max rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)

    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"\n2:4 bf16 {'shape':>10} {'tokens':>6} {'cuBLAS us':>9} {'op us':>8} {'semi us':>8} {'op':>6} {'semi':>6}  route")
    for (o, k) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = (torch.randn(o, k, device=dev) / k**0.5).bfloat16()
        mask = nm.nm_mask(w.abs().float().cpu(), 2, 4).to(dev)
        wd = w * mask
        v, p = nm.pack(w.cpu(), mask.cpu(), 2, 4)
        copies = max(2, -(-8 * l2 // (w.numel() * 2)))
        wds = [wd.clone() for _ in range(copies)]
        vps = [(v.to(dev), p.to(dev)) for _ in range(copies)]
        for tokens in (1, 4, 16, 64, 128, 256, 1024, 4096):
            x = torch.randn(tokens, k, device=dev).bfloat16()
            it = {"d": 0, "o": 0, "s": 0}

            def dense():
                it["d"] += 1
                return F.linear(x, wds[it["d"] % copies])

            def op():
                it["o"] += 1
                vv, pp = vps[it["o"] % copies]
                return torch.ops.sparsec.nm_linear(x, vv, pp, None, 2, 4, -1.0)

            semi = None
            if tokens >= 16:
                backend = nm._available_semi_structured_backends()[0]
                try:
                    sws = [nm._semi_structured_weight(vv, pp, 2, 4, k, backend) for vv, pp in vps]

                    def semi():
                        it["s"] += 1
                        return F.linear(x, sws[it["s"] % copies])
                except Exception as e:  # noqa: BLE001 - report and go on: this is a probe
                    print(f"semi-structured {backend} unavailable: {e}", flush=True)
            op()
            td = triton.testing.do_bench(dense, warmup=25, rep=150, return_mode="median")
            to = triton.testing.do_bench(op, warmup=25, rep=150, return_mode="median")
            ts = triton.testing.do_bench(semi, warmup=25, rep=150, return_mode="median") if semi else float("nan")
            route = nm.semi_structured_route(tokens, o, k, 2, 4, torch.bfloat16, torch.cuda.get_device_capability(),
                                             nm._available_semi_structured_backends()) or (
                                                 "triton" if tokens <= MAX_BATCH else "dense")
            rows.append(dict(shape=f"{o}x{k}", tokens=tokens, cublas_us=td * 1e3, op_us=to * 1e3,
                             semi_us=ts * 1e3, route=route))
            print(f"         {o:>5}x{k:<5} {tokens:>6} {td * 1e3:>9.1f} {to * 1e3:>8.1f} {ts * 1e3:>8.1f} "
                  f"{td / to:>5.2f}x {td / ts:>5.2f}x  {route}", flush=True)
    return fails, rows


def rsparse_check(dev: str) -> tuple[int, list[dict]]:
    import triton

    from sparsec.kernels.rsparse import ops as R  # its CUDA kernel imports the Triton launcher on first use

    fails = 0
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 4e-3}
    flt_max = 3.4028234663852886e38
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (b, k, n, r) in [(1, 1000, 4099, 0), (3, 576, 1536, 37), (16, 1536, 576, 100), (5, 4096, 4096, 512),
                             (17, 576, 1536, 37)]:
            x = torch.randn(b, k, device=dev).to(dtype)
            wt = (torch.randn(k, n, device=dev) / k**0.5).to(dtype)
            scale = torch.rand(k, device=dev) + 0.5
            v = (torch.randn(k, r, device=dev) / k**0.5).to(dtype)
            us = (torch.randn(r, n, device=dev) / max(r, 1) ** 0.5).to(dtype)
            bias = torch.randn(n, device=dev).to(dtype)
            res = torch.randn(b, n, device=dev).to(dtype)
            med = float((x.float().abs() * scale).flatten().median())
            for name, t in (("half", med), ("all", -1.0), ("none", flt_max)):
                got = torch.ops.sparsec.rsparse_linear_t(x, wt, bias, scale, v, us, t, None, res)
                ref = R.rsparse_linear_t_reference(x, wt, bias, scale, v, us, t, residual=res)
                err = ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
                ok = err < 2 * tol[dtype]  # 2: the reference rounds y before adding the residual
                fails += not ok
                print(f"rsparse {str(dtype):15} b={b:<2} {k}x{n} r={r:<3} {name:4}: max rel err {err:.2e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
        x = torch.randn(2, 576, device=dev).to(dtype)  # a NaN input is active: its row is NaN
        x[0, 3] = float("nan")
        wt, scale = torch.randn(576, 300, device=dev).to(dtype), torch.rand(576, device=dev)
        v, us = torch.randn(576, 20, device=dev).to(dtype), torch.randn(20, 300, device=dev).to(dtype)
        got = torch.ops.sparsec.rsparse_linear_t(x, wt, None, scale, v, us, flt_max)
        ok = bool(torch.isnan(got[0]).all()) and not bool(torch.isnan(got[1]).any())
        fails += not ok
        print(f"rsparse {str(dtype):15} NaN input stays active: {'ok' if ok else 'FAIL'}", flush=True)

    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    k = n = 4096
    r = round(0.25 * k * n / (k + n))  # 512: the low-rank term reads a quarter of the dense weight
    w = (torch.randn(n, k, device=dev) / k**0.5).bfloat16()
    copies = max(4, -(-8 * l2 // (w.numel() * 2)))
    ws = [w.clone() for _ in range(copies)]
    sites = [(w.t().contiguous(), (torch.randn(k, r, device=dev) / k**0.5).bfloat16(),
              (torch.randn(r, n, device=dev) / r**0.5).bfloat16()) for _ in range(copies)]
    scale = w.float().norm(dim=0)
    print(f"\nR-Sparse bf16 {n}x{k} r={r} density 0.5 {'tokens':>6} {'cuBLAS us':>9} {'op us':>8} {'speedup':>8} "
          f"{'graph: cuBLAS us':>16} {'op us':>8} {'speedup':>8} {'% ideal':>7}")
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, k, device=dev).bfloat16()
        t = float((x.float().abs() * scale).flatten().median())  # density 0.5 over all (token, channel)
        m = ~(x.float().abs() * scale <= t)
        # the rows the kernels read: of W^T where any token is active, of v where any is not
        active, inactive = int(m.any(0).sum()), int((~m).any(0).sum())
        ideal = (n * k) / (active * n + inactive * r + r * n)  # bytes: dense / R-Sparse
        it = {"d": 0, "s": 0}

        def dense():
            it["d"] += 1
            return F.linear(x, ws[it["d"] % copies])

        def op():
            it["s"] += 1
            wt, v, us = sites[it["s"] % copies]
            return torch.ops.sparsec.rsparse_linear_t(x, wt, None, scale, v, us, t, ws[0])

        op()  # autotune outside the timing
        td = triton.testing.do_bench(dense, warmup=25, rep=150, return_mode="median")
        to = triton.testing.do_bench(op, warmup=25, rep=150, return_mode="median")
        try:  # every copy once per replay: the weights stay out of L2 as in the eager timing
            gd = triton.testing.do_bench_cudagraph(lambda: [dense() for _ in range(copies)], rep=100,
                                                   return_mode="median") / copies
            go = triton.testing.do_bench_cudagraph(lambda: [op() for _ in range(copies)], rep=100,
                                                   return_mode="median") / copies
        except Exception as e:  # noqa: BLE001 - report and go on: this is a probe
            print(f"CUDA graph timing failed: {e}", flush=True)
            gd = go = float("nan")
        rows.append(dict(shape=f"{n}x{k}", rank=r, tokens=tokens, active_rows=active, inactive_rows=inactive,
                         cublas_us=td * 1e3, op_us=to * 1e3, graph_cublas_us=gd * 1e3, graph_op_us=go * 1e3,
                         ideal_speedup=ideal))
        print(f"{'':>38} {tokens:>6} {td * 1e3:>9.1f} {to * 1e3:>8.1f} {td / to:>7.2f}x {gd * 1e3:>16.1f} "
              f"{go * 1e3:>8.1f} {gd / go:>7.2f}x {100 * gd / go / ideal:>6.0f}%", flush=True)
    return fails, rows


if __name__ == "__main__":
    sys.exit(main())
