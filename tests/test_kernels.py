"""The C++ CPU kernels against their plain-torch references, and the kernel cache.

Tolerances: fp32 1e-4 relative (the kernel sums the active rows in another order than the
reference GEMM: a few ulps of the row sums); bf16 one to two bf16 ulps (2^-8 relative, both
accumulate in fp32 and round once at the end, but the CATS intermediate rounds per element).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsec.kernels import activation as A
from sparsec.kernels import cpu

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.fixture(scope="module")
def ext():
    e = cpu.extension()
    assert e is not None, "the C++ kernels must build on the CI machine"
    return e


def _close(got, ref, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol["atol"] * scale, rtol=tol["rtol"], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n", [(1, 1000, 4099), (3, 1000, 4099), (16, 577, 131), (5, 17, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparse_linear_matches_reference(ext, dtype, batch, k, n, sparsity):
    g = torch.Generator().manual_seed(batch * 7 + k)
    x = torch.randn(batch, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    t = float(torch.quantile(x.float().abs().flatten(), sparsity)) if sparsity else -1.0
    for bias in (None, b):
        got = ext.sparse_linear(x, wt, bias, t)
        ref = A.sparse_linear_reference(x, wt, bias, t)
        assert got.dtype == dtype and got.shape == (batch, n)
        _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 4, 7, 12, 16])
def test_multi_token_kernel_path_with_shared_inactive_inputs(ext, dtype, batch):
    """Tokens that share their inactive inputs keep the union density low, so the kernel's
    multi-token path runs (not the dense fallback) at every batch size and dtype; some
    tokens are entirely inactive in some row groups (the skip)."""
    g = torch.Generator().manual_seed(batch)
    k, n = 1001, 4099  # odd: a partial 4-row group and a masked column tail
    x = torch.randn(batch, k, generator=g).to(dtype)
    x[:, torch.randperm(k, generator=g)[: int(0.85 * k)]] = 0  # 85% of inputs off in every token
    x[0, :500] = 0  # token 0 also inactive over a wide stretch
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    t = 1e-3
    _close(ext.sparse_linear(x, wt, b, t), A.sparse_linear_reference(x, wt, b, t), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [8, 16])
def test_dense_fallback_thresholds_exactly(ext, dtype, batch):
    """Above the break-even union density the kernel thresholds the tokens (vectorised, 16
    inputs at a time plus a masked tail) and runs the library GEMM: the reference's result,
    with |x| == t dropped, NaN and +-inf kept (outputs 0 and 1 read one input each, exactly).
    (bf16 with AMX takes that path here; fp32 only on builds without AVX-512 -- with it, the
    kernel beats the GEMM at any density and must give the same result.)"""
    g = torch.Generator().manual_seed(batch)
    k, n = 1001, 67
    x = torch.randn(batch, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    w[:2] = 0
    w[0, 10] = w[1, 1000] = 1  # output 0 = s_t(x)[:, 10], output 1 = s_t(x)[:, 1000]
    t = float(x[0, 10].abs())  # token 0's input 10 sits exactly at the threshold: dropped
    x[1, 3], x[2, 1000], x[3, 1000], x[4, 16] = float("nan"), float("inf"), -float("inf"), -0.0
    got = ext.sparse_linear(x, w.t().contiguous(), None, t, w)
    ref = F.linear(A.threshold_reference(x, t), w)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[1]).all()
    assert got[0, 0] == 0 and got[2, 1] == float("inf") and got[3, 1] == -float("inf")
    kept = A.threshold_reference(x, t)[5:, 1000]  # the masked tail lane, tokens without inf/nan
    assert torch.equal(got[5:, 1], kept)
    fin = torch.isfinite(ref)
    _close(got[fin], ref[fin], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 12, 40])
def test_group_weights_dense_paths(ext, dtype, rows):
    """A group of linears fused into one call (q/k/v) passes each member's original weight:
    the dense paths (40 rows: prefill; 12 bf16 rows with AMX: the break-even fallback) run one
    GEMM per member and concatenate; the kernel path (3 rows) ignores them. Same result as
    the reference either way; a group whose widths do not add up is an error."""
    g = torch.Generator().manual_seed(rows)
    k = 101
    ws = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for n in (37, 13, 13)]
    wt = torch.cat(ws).t().contiguous()
    x = torch.randn(rows, k, generator=g).to(dtype)
    x[0, 4] = float("nan")
    t = 0.2
    got = torch.ops.sparsec.sparse_linear(x, wt, None, t, None, None, ws)
    ref = A.sparse_linear_reference(x, wt, None, t)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[0]).all()
    _close(got[1:], ref[1:], dtype)
    if rows > 16:
        with pytest.raises(ValueError, match="group_weights have 50 output features together, weight_t has 63"):
            torch.ops.sparsec.sparse_linear(x, wt, None, t, None, None, ws[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_edge_cases(ext, dtype):
    x = torch.randn(3, 37).to(dtype)
    wt = torch.randn(37, 29).to(dtype)
    b = torch.randn(29).to(dtype)
    # sparsity 1: nothing is read, the output is the bias exactly
    assert torch.equal(ext.sparse_linear(x, wt, b, float("inf")), b.expand(3, 29))
    assert torch.equal(ext.sparse_linear(x, wt, None, 1e30), torch.zeros(3, 29, dtype=dtype))
    # sparsity 0 (t below every |x|): the dense product
    _close(ext.sparse_linear(x, wt, b, -1.0), F.linear(x, wt.t(), b), dtype)
    # NaN / inf inputs propagate exactly as in the reference
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    got = ext.sparse_linear(x, wt, b, 0.5)
    ref = A.sparse_linear_reference(x, wt, b, 0.5)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[0]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    _close(got[fin], ref[fin], dtype)


def test_ops_reject_malformed_arguments(ext):
    """The ops are public (torch.ops.sparsec.*): arguments their kernels would misread fail
    with a message instead of reading past a buffer or answering something else."""
    from sparsec.kernels import nm

    x = torch.randn(1, 64)
    wt = torch.randn(64, 48)
    with pytest.raises(RuntimeError, match=r"sparse_linear: bias must be \[48\], got \[1\]"):
        torch.ops.sparsec.sparse_linear(x, wt, torch.tensor([0.5]), 0.1)
    with pytest.raises(RuntimeError, match=r"bias must be \[48\], got \[1, 48\]"):
        torch.ops.sparsec.sparse_linear(x, wt, torch.zeros(1, 48), 0.1)
    with pytest.raises(RuntimeError, match="sparse_linear: the threshold is NaN"):
        torch.ops.sparsec.sparse_linear(x, wt, None, float("nan"))
    g, u, dt = torch.randn(40, 64), torch.randn(40, 64), torch.randn(40, 64)
    with pytest.raises(RuntimeError, match=r"down_bias must be \[64\], got \[1\]"):
        torch.ops.sparsec.sparse_cats_mlp(x, g, None, u, None, dt, torch.zeros(1), 0.1, "silu")
    with pytest.raises(RuntimeError, match=r"do not fit 64 input features"):
        torch.ops.sparsec.sparse_cats_mlp(x, g, None, u[:39], None, dt, None, 0.1, "silu")
    w = torch.randn(48, 64)
    v, p = nm.pack(w, nm.nm_mask(w.abs(), 2, 4), 2, 4)
    with pytest.raises(RuntimeError, match=r"positions of shape \[47, 8\]"):
        torch.ops.sparsec.nm_linear(x, v, p[:47], None, 2, 4, -1.0)
    with pytest.raises(RuntimeError, match=r"needs 1 <= n < m <= 256, got n=0, m=0"):
        torch.ops.sparsec.nm_linear(torch.randn(1, 8), torch.empty(2, 0), torch.empty(2, 4, dtype=torch.uint8),
                                    None, 0, 0, -1.0)
    with pytest.raises(RuntimeError, match=r"nm_linear: bias must be \[48\]"):
        torch.ops.sparsec.nm_linear(x, v, p, torch.zeros(1), 2, 4, -1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_cats_mlp_matches_reference(ext, dtype, act, batch):
    # the output size o differs from the input size h (a plain MLP 201 -> 577 -> 95 is legal:
    # the kernel once assumed o == h, as in a transformer, and read W_down^T with the wrong width)
    g = torch.Generator().manual_seed(batch)
    h, i, o = 201, 577, 95
    x = torch.randn(batch, h, generator=g).to(dtype)
    wg, wu = [(torch.randn(i, h, generator=g) / h**0.5).to(dtype) for _ in range(2)]
    wd = (torch.randn(o, i, generator=g) / i**0.5).to(dtype)
    bg, bu, bd = (torch.randn(n, generator=g).to(dtype) for n in (i, i, o))
    for gb in (None, bg):
        a = A.ACTIVATIONS[act](F.linear(x, wg, gb))
        t = float(torch.quantile(a.float().abs().flatten(), 0.5))
        for ub, db in ((None, None), (bu, bd)):
            got = A._cats_cpu(x, wg, gb, wu, ub, wd.t().contiguous(), db, t, act)
            ref = A.cats_mlp_reference(x, wg, gb, wu, ub, wd, db, t, act)
            _close(got, ref, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_cats_mlp_edges(ext, dtype, batch):
    """Sparsity 0 (every channel active: the dense MLP), sparsity 1 (nothing read: the down
    bias), and NaN / inf activations kept active and propagated as in the reference. The scan
    is the vectorised one (16 channels per compare, a masked tail: i = 37)."""
    g = torch.Generator().manual_seed(batch)
    h, i, o = 33, 37, 19
    x = torch.randn(batch, h, generator=g).to(dtype)
    wg, wu = [(torch.randn(i, h, generator=g) / h**0.5).to(dtype) for _ in range(2)]
    wd = (torch.randn(o, i, generator=g) / i**0.5).to(dtype)
    bd = torch.randn(o, generator=g).to(dtype)
    args = (wg, None, wu, None, wd.t().contiguous(), bd)
    for t in (-1.0, 0.0, 0.3):
        _close(A._cats_cpu(x, *args, t, "silu"), A.cats_mlp_reference(x, wg, None, wu, None, wd, bd, t, "silu"),
               dtype, scale=4.0)
    assert torch.equal(A._cats_cpu(x, *args, float("inf"), "silu"), bd.expand(batch, o))
    # a decode step's 3-D token (bf16 batch 1: the gate's own row loop) through the op
    got = torch.ops.sparsec.sparse_cats_mlp(x[:1].view(1, 1, h), wg, bd[:1].expand(i).contiguous(), wu, None,
                                            wd.t().contiguous(), bd, 0.3, "gelu")
    ref = A.cats_mlp_reference(x[:1], wg, bd[:1].expand(i), wu, None, wd, bd, 0.3, "gelu")
    assert got.shape == (1, 1, o)
    _close(got.view(1, o), ref, dtype, scale=4.0)
    x[0, 5] = float("nan")  # every gate and up product of token 0 is NaN: all of its channels active
    got, ref = A._cats_cpu(x, *args, 0.3, "silu"), A.cats_mlp_reference(x, wg, None, wu, None, wd, bd, 0.3, "silu")
    assert torch.isnan(got[0]).all() and torch.equal(torch.isnan(got), torch.isnan(ref))
    _close(got[1:], ref[1:], dtype, scale=4.0)


def test_ops_dispatch_and_prefill_path(ext):
    """3-D inputs, >16 rows (prefill: the dense GEMM path) and opcheck on the prepared ops."""
    x = torch.randn(2, 20, 64)
    w = torch.randn(48, 64)
    b = torch.randn(48)
    ref = A.threshold_linear_reference(x, w, b, 0.6)
    torch.testing.assert_close(torch.ops.sparsec.sparse_linear(x, w.t().contiguous(), b, 0.6), ref)
    torch.testing.assert_close(torch.ops.sparsec.sparse_linear(x[:1, :5], w.t().contiguous(), b, 0.6), ref[:1, :5],
                               atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.sparsec.sparse_linear.default, (x[:, :3], w.t().contiguous(), b, 0.6))
    wg, wu, wd = torch.randn(96, 64), torch.randn(96, 64), torch.randn(64, 96)
    torch.library.opcheck(torch.ops.sparsec.sparse_cats_mlp.default,
                          (x[:, :3], wg, None, wu, None, wd.t().contiguous(), None, 0.3, "silu"))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        torch.ops.sparsec.sparse_cats_mlp(x, wg, None, wu, None, wd.t().contiguous(), None, 0.3, "swish")


def test_unprepared_op_refreshes_its_transposed_copy(ext):
    w = torch.randn(40, 30)
    x = torch.randn(1, 30)
    torch.testing.assert_close(torch.ops.sparsec.threshold_linear(x, w, None, 0.3),
                               A.threshold_linear_reference(x, w, None, 0.3), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        w.mul_(3)  # in place: the cached W^T must not be used any more
    torch.testing.assert_close(torch.ops.sparsec.threshold_linear(x, w, None, 0.3),
                               A.threshold_linear_reference(x, w, None, 0.3), atol=1e-5, rtol=1e-5)


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding ``addr`` (``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    return set()


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are a Linux feature")
def test_prepared_weights_ask_for_huge_pages(monkeypatch):
    """The kernels' prepared weights (scattered row reads) live in 2 MiB-aligned memory marked
    MADV_HUGEPAGE ("hg"); small ones and SPARSEC_HUGE_PAGES=0 get plain torch memory."""
    big = cpu.empty_huge((1000, 1537), torch.float32)  # 6.1 MB: an odd size, not a page multiple
    assert big.shape == (1000, 1537) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % cpu.HUGE_PAGE == 0
    assert "hg" in _vm_flags(big.data_ptr())
    big.fill_(3.0)  # writable, every byte in range
    assert float(big.sum()) == 3.0 * 1000 * 1537
    w = torch.randn(2500, 1001)
    wt = A.transposed(w)
    assert torch.equal(wt, w.t()) and wt.data_ptr() % cpu.HUGE_PAGE == 0
    assert "hg" not in _vm_flags(cpu.empty_huge((10, 3), torch.bfloat16).data_ptr())
    monkeypatch.setenv("SPARSEC_HUGE_PAGES", "0")
    assert "hg" not in _vm_flags(cpu.empty_huge((1000, 1537), torch.float32).data_ptr())


def test_cache_key_changes_with_isa_and_flags(monkeypatch):
    k512, f512 = cpu._key("avx512")
    k2, f2 = cpu._key("avx2")
    kp, fp = cpu._key("portable")
    assert len({k512, k2, kp}) == 3 and "-mavx512f" in f512 and "-mavx2" in f2 and not any("-m" in f for f in fp)
    monkeypatch.setattr(cpu, "BASE_FLAGS", cpu.BASE_FLAGS + ["-DX=1"])
    assert cpu._key("avx512")[0] != k512
    monkeypatch.setenv("SPARSEC_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SPARSEC_CPU_ISA='sse9'"):
        cpu.isa()


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from sparsec.kernels import cpu, activation as A
    e = cpu.extension()
    x = torch.randn(3, 1000); wt = torch.randn(1000, 4099)
    ok = torch.allclose(e.sparse_linear(x, wt, None, 0.7), A.sparse_linear_reference(x, wt, None, 0.7),
                        atol=1e-3, rtol=1e-4)
    xb, wb = x.bfloat16(), wt.bfloat16()
    okb = torch.allclose(e.sparse_linear(xb, wb, None, 0.7).float(),
                         A.sparse_linear_reference(xb, wb, None, 0.7).float(), atol=0.1, rtol=2e-2)
    print(json.dumps({"isa": e.isa(), "ok": bool(ok and okb), **cpu.build_info()[cpu.isa()]}))
""")


@pytest.mark.slow
def test_fallback_isas_build_and_lock(tmp_path):
    """AVX2 and portable builds are correct; two processes building one key at once share it.

    Runs three builds in parallel subprocesses (about 40 s each on 2 cores)."""
    # the waiting process gives up after SPARSEC_BUILD_LOCK_TIMEOUT (300 s) and builds itself: on a
    # loaded 2-core machine two builds of four sources in parallel took longer than that here
    # (CI then saw two builders), so the test waits as long as its own timeout
    env = {**os.environ, "SPARSEC_CACHE": str(tmp_path), "SPARSEC_BUILD_LOCK_TIMEOUT": "900"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env={**env, "SPARSEC_CPU_ISA": isa},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for isa in ("portable", "portable", "avx2")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["isa"] for o in outs] == ["portable", "portable", "avx2"] and all(o["ok"] for o in outs)
    # exactly one of the two portable processes built; the other waited on the lock and loaded it
    assert sorted(o["cached"] for o in outs[:2]) == [False, True]
    assert outs[0]["path"] == outs[1]["path"] and str(tmp_path) in outs[0]["path"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 20])  # the kernel's batch paths and the prefill GEMM
def test_residual_epilogue_of_every_prepared_op(ext, dtype, rows):
    """``residual=`` adds the residual to the op's output: the same as adding it afterwards,
    on every path (kernel, dense fallback), and a residual of another shape is refused."""
    from sparsec.kernels import nm

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 72, generator=g).to(dtype)
    w, b = torch.randn(37, 72, generator=g).to(dtype), torch.randn(37, generator=g).to(dtype)
    r = torch.randn(rows, 1, 37, generator=g).to(dtype)
    wt = w.t().contiguous()
    calls = {
        "sparse_linear": lambda **kw: torch.ops.sparsec.sparse_linear(x, wt, b, 0.4, w, **kw),
        "nm_linear": lambda **kw: torch.ops.sparsec.nm_linear(x, *nm.pack(w, nm.nm_mask(w.abs().float(), 2, 4), 2, 4),
                                                              b, 2, 4, 0.4, True, **kw),
    }
    wg, wu, wd = (torch.randn(56, 72, generator=g).to(dtype), torch.randn(56, 72, generator=g).to(dtype),
                  torch.randn(37, 56, generator=g).to(dtype))
    calls["sparse_cats_mlp"] = lambda **kw: torch.ops.sparsec.sparse_cats_mlp(
        x, wg, None, wu, None, wd.t().contiguous(), b, 0.3, "silu", **kw)
    for name, call in calls.items():
        torch.testing.assert_close(call(residual=r), call() + r, msg=name)
        with pytest.raises(RuntimeError, match="residual of shape"):
            call(residual=r[..., :5])
    torch.library.opcheck(torch.ops.sparsec.sparse_linear.default, (x, wt, b, 0.4, w, r))
