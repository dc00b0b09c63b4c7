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
    with open(sys.argv[1] if len(sys.argv) > 1 else "gpu_bench.json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "failures": fails, "rows": rows, "nm_rows": nm_rows},
                  f, indent=1)
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


if __name__ == "__main__":
    sys.exit(main())
