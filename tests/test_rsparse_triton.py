"""The R-Sparse family's generated Triton kernels (``kernels/rsparse/triton.py``), checked
without a GPU the two ways every Triton kernel is (DEVELOPERS.md, ``tests/test_triton.py``):

1. run under ``TRITON_INTERPRET=1`` on CPU tensors against ``rsparse_linear_t_reference``,
   on small odd shapes (the interpreter runs every program in numpy: ~1000x slow);
2. compiled ahead of time to cubins for sm_80 and sm_90 (Triton ships ptxas), in a fresh
   process; and the ``triton_op`` twin decomposed into its two kernels as Inductor does.

Tolerances (``TOL``, as in test_triton.py): fp32 1e-4 -- split-K partial sums added by
``atomic_add`` in another order than the reference's matmuls, both in fp32. bf16 two ulps of
the output (2^-7 relative; atol for outputs near 0 after cancellation): both sides multiply
bf16 values exactly and accumulate in fp32, so they differ by summation order before the one
rounding to bf16 -- enough to move the result by an ulp; with a residual the reference rounds
twice (``y`` to bf16, then ``y + residual``) and the kernel once, one more ulp (``scale=2``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsec.kernels._triton.source import _MODULES  # noqa: E402
from sparsec.kernels.rsparse import ops as R  # noqa: E402
from sparsec.kernels.rsparse import triton as RT  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 1.6e-2)}
#: the largest finite fp32: no finite score exceeds it, so nothing is active but NaN / inf
FLT_MAX = 3.4028234663852886e38
K, N = 40, 24  # odd sizes: every block of the interpreter's configuration is partly masked


@pytest.fixture
def interpret(monkeypatch, tmp_path):
    # conftest sets TRITON_INTERPRET=1 before anything imports triton (on machines without a
    # GPU): the interpreter must be chosen before triton's first import
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (conftest does on CPU machines)")
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))
    yield
    _MODULES.clear()


def _site(rank: int, dtype: torch.dtype, seed: int = 0):
    """``(W^T, bias, scale, v, us)`` of an in=K, out=N site; ``scale`` fp32 and positive, as
    calibration makes it (column norms of W)."""
    g = torch.Generator().manual_seed(seed)
    wt = (torch.randn(K, N, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    scale = torch.rand(K, generator=g) + 0.5
    v = (torch.randn(K, rank, generator=g) / 2).to(dtype)
    us = (torch.randn(rank, N, generator=g) / 2).to(dtype)
    return wt, bias, scale, v, us


def _between(x: torch.Tensor, scale: torch.Tensor, q: float) -> float:
    """A threshold half-way between two neighbouring scores ``|x| s`` near the q-quantile, so
    that no score sits on it (the kernel computes the same fp32 product; this keeps the test
    independent of that)."""
    a = (x.float().abs() * scale).flatten().sort().values
    i = min(int(q * (len(a) - 1)), len(a) - 2)
    return float((a[i] + a[i + 1]) / 2)


def _close(got, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol * scale, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_rsparse_interpreted(interpret, dtype, rank, batch):
    wt, bias, scale, v, us = _site(rank, dtype, seed=rank + batch)
    g = torch.Generator().manual_seed(7 + batch)
    x = torch.randn(batch, K, generator=g).to(dtype)
    res = torch.randn(batch, N, generator=g).to(dtype)
    t = _between(x, scale, 0.5)
    ref = R.rsparse_linear_t_reference(x, wt, None, scale, v, us, t)
    _close(RT.rsparse_linear_cuda(x, wt, None, scale, v, us, t), ref, dtype)
    # the fused epilogue: bias and residual added in rsparse_out's store
    got = RT.rsparse_linear_cuda(x, wt, bias, scale, v, us, t, residual=res)
    _close(got, R.rsparse_linear_t_reference(x, wt, bias, scale, v, us, t, residual=res), dtype, 2)
    assert got.dtype == dtype and got.shape == (batch, N)


@pytest.mark.parametrize("rank", [0, 5])
def test_rsparse_interpreted_all_and_none_active(interpret, rank):
    wt, bias, scale, v, us = _site(rank, torch.float32, seed=11)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(12))
    # every channel active: the sparse term is the dense product and z = 0
    _close(RT.rsparse_linear_cuda(x, wt, bias, scale, v, us, -1.0), x @ wt + bias, torch.float32)
    # none active: only the low-rank term (the W^T programs return without a load)
    got = RT.rsparse_linear_cuda(x, wt, bias, scale, v, us, FLT_MAX)
    _close(got, (x @ v) @ us + bias, torch.float32)
    if rank == 0:  # nothing at all: y is the bias, exactly
        assert torch.equal(got, bias.expand(2, N))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN
def test_rsparse_interpreted_nan_and_inf(interpret):
    """A NaN input is active (``!(NaN <= t)``) even above every finite score: its row of y is
    NaN, as the reference's; the other row is untouched. An inf is active and gives inf/NaN
    exactly where the reference does."""
    wt, bias, scale, v, us = _site(5, torch.float32, seed=13)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(14))
    x[0, 3] = float("nan")
    for t in (0.5, FLT_MAX):
        got = RT.rsparse_linear_cuda(x, wt, bias, scale, v, us, t)
        ref = R.rsparse_linear_t_reference(x, wt, bias, scale, v, us, t)
        assert torch.isnan(got[0]).all() and torch.isnan(ref[0]).all()
        _close(got[1], ref[1], torch.float32)
    x[0, 3], x[1, 4] = 1.0, float("inf")
    got, ref = RT.rsparse_linear_cuda(x, wt, None, scale, v, us, 0.5), R.rsparse_linear_t_reference(
        x, wt, None, scale, v, us, 0.5)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
    _close(got[0], ref[0], torch.float32)


def test_rsparse_interpreted_shapes_and_routes(interpret):
    """Leading dimensions are flattened into rows; more than 16 rows take the op's dense path
    (as on CPU); a residual of the wrong shape is refused as by the reference."""
    wt, bias, scale, v, us = _site(5, torch.float32, seed=15)
    g = torch.Generator().manual_seed(16)
    x3 = torch.randn(1, 3, K, generator=g)
    got = RT.rsparse_linear_cuda(x3, wt, bias, scale, v, us, 0.4)
    assert got.shape == (1, 3, N)
    _close(got, R.rsparse_linear_t_reference(x3, wt, bias, scale, v, us, 0.4), torch.float32)
    x17 = torch.randn(17, K, generator=g)
    _close(RT.rsparse_linear_cuda(x17, wt, bias, scale, v, us, 0.4),
           R.rsparse_linear_t_reference(x17, wt, bias, scale, v, us, 0.4), torch.float32)
    with pytest.raises(ValueError, match="residual"):
        RT.rsparse_linear_cuda(x3, wt, bias, scale, v, us, 0.4, residual=torch.zeros(3, N))
    with pytest.raises(ValueError, match="scale has shape"):
        RT.rsparse_linear_cuda(x3, wt, bias, scale[:-1], v, us, 0.4)


def test_twin_runs_eagerly(interpret):
    """The twin computes what the opaque op does: the generated kernels up to 16 rows, the
    opaque op (here its CPU path: the dense GEMMs) above."""
    wt, bias, scale, v, us = _site(5, torch.float32, seed=17)
    g = torch.Generator().manual_seed(18)
    for rows in (3, 17):
        x, res = torch.randn(rows, K, generator=g), torch.randn(rows, N, generator=g)
        got = torch.ops.sparsec.triton_rsparse_linear_t(x, wt, bias, scale, v, us, 0.4, None, res)
        _close(got, R.rsparse_linear_t_reference(x, wt, bias, scale, v, us, 0.4, residual=res), torch.float32, 2)


def test_cuda_kernels_registered():
    """Both ops dispatch CUDA tensors to the Triton launcher (no GPU here to call them)."""
    for op in ("sparsec::rsparse_linear_t", "sparsec::rsparse_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_generated_source_is_specialised():
    spec = RT.RSparseSpec("rsparse_linear_t", torch.bfloat16, 1000, 4099, has_bias=True, rank=37)
    assert spec.name.rsplit("_", 1)[0] == "rsparse_linear_t_bfloat16_k1000_n4099_r37_bias"
    src = RT._render(spec, 9)
    assert "offs_k < 1000" in src and "offs_n < 4099" in src and "offs_j < 37" in src and "ACC row 4136" in src
    assert src.count("triton.Config(") == len(RT.CONFIGS[9]) + len(RT.OUT_CONFIGS[9])
    # bf16 on the GPU: tensor-core dots, z split into two bf16 halves; fp16 keeps z in fp32
    assert "tl.dot(xs, w, out_dtype=tl.float32)" in src and "tl.dot(z.to(tl.bfloat16), u" in src
    fp16 = RT._render(RT.RSparseSpec("rsparse_linear_t", torch.float16, 64, 64, rank=8), 8)
    assert 'tl.dot((z).to(tl.float32), (u).to(tl.float32), input_precision="ieee"' in fp16


def test_lowering_swaps_cuda_sites_only():
    """The family's ``Lowering.triton`` (core's ``lower`` calls it on a GPU machine) swaps
    ``rsparse_linear_t`` nodes on CUDA for the twin; CPU nodes keep the C++ kernel."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsec.plugins import get_registry

    graph = fx.Graph()
    nodes = {}
    with FakeTensorMode():
        for dev in ("cpu", "cuda"):
            args = tuple(graph.placeholder(f"{dev}_{i}") for i in range(6)) + (0.5,)
            nodes[dev] = graph.call_function(torch.ops.sparsec.rsparse_linear_t.default, args,
                                             {"residual": graph.placeholder(f"{dev}_res")})
            nodes[dev].meta["val"] = torch.empty(2, 7, device=dev)
    graph.output(tuple(nodes.values()))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert get_registry().lowerings["sparsec::rsparse_linear_t"].triton(gm) == 1
    assert nodes["cpu"].target is torch.ops.sparsec.rsparse_linear_t.default
    assert nodes["cuda"].target is torch.ops.sparsec.triton_rsparse_linear_t.default
    assert set(nodes["cuda"].kwargs) == {"residual"}  # same schema: arguments kept as they are


_AOT = """
import json, torch
from sparsec.kernels import _triton
from sparsec.kernels.rsparse.triton import RSparseSpec
specs = [  # the bench shape (bf16, both epilogues), and rank 0 in fp16 (z @ us in IEEE fp32)
    (RSparseSpec("rsparse_linear_t", torch.bfloat16, 4096, 4096, has_bias=True, has_residual=True, rank=512), (80, 90)),
    (RSparseSpec("rsparse_linear_t", torch.float16, 40, 24, rank=0), (80,)),
]
out = []
for spec, ccs in specs:
    for cc in ccs:
        res = _triton.aot_compile(spec, cc)
        out.append({"name": spec.name, "cc": cc, "kernels": {k: [c[:4].hex() for c in v] for k, v in res.items()}})
print(json.dumps(out))
"""


def test_aot_cubin(tmp_path):
    """Both kernels, in every autotune configuration of the architecture, compile to cubins for
    sm_80 / sm_90. In a fresh process without TRITON_INTERPRET: Triton cannot mix interpreted
    and compiled kernels in one process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEC_CACHE"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(o["name"].split("_cuda")[0], o["cc"]) for o in out] == [
        ("rsparse_linear_t_bfloat16_k4096_n4096_r512_bias_res", 80),
        ("rsparse_linear_t_bfloat16_k4096_n4096_r512_bias_res", 90), ("rsparse_linear_t_float16_k40_n24_r0", 80)]
    for o in out:
        arch = 9 if o["cc"] >= 90 else 8
        assert set(o["kernels"]) == {"rsparse_gemv", "rsparse_out"}
        assert len(o["kernels"]["rsparse_gemv"]) == len(RT.CONFIGS[arch])
        assert len(o["kernels"]["rsparse_out"]) == len(RT.OUT_CONFIGS[arch])
        for kname, heads in o["kernels"].items():
            assert heads and all(h == "7f454c46" for h in heads), (o["name"], kname)  # ELF cubins


_DECOMPOSE = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
import sparsec.kernels.rsparse.triton  # the triton_op twin

class SM90:  # what Inductor asks the driver while it analyses a kernel (no GPU needed)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def is_active(self):
        return True
triton.runtime.driver.set_active(SM90())

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wt, self.b = torch.randn(61, 43, generator=g), torch.randn(43, generator=g)
        self.s, self.v = torch.rand(61, generator=g), torch.randn(61, 7, generator=g)
        self.us = torch.randn(7, 43, generator=g)
    def forward(self, x, res):
        return torch.ops.sparsec.triton_rsparse_linear_t(x, self.wt, self.b, self.s, self.v, self.us, 0.4, None, res)

ep = torch.export.export(M(), (torch.randn(3, 61), torch.randn(3, 43)))
opaque = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsec.")]
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
dec = ep.run_decompositions(decompose_custom_triton_ops=True)
kernels = []
for n in dec.graph.nodes:
    if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
        k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
        kernels.append([getattr(k, "fn", k).__name__, sorted(n.kwargs.get("tensors_to_clone", []))])
hashed = sorted(getattr(k, "fn", k).__name__
                for k in torch._library.triton.get_triton_kernels_for_op("sparsec::triton_rsparse_linear_t"))
print(json.dumps({"opaque": opaque, "kernels": kernels, "hashed": hashed}))
"""


def test_twin_decomposes_into_kernels(tmp_path):
    """What Inductor does with the twin on a GPU, done on CPU (as test_triton.py does for the
    other families): export keeps it as one op; decomposed, it is the two launches, with
    Triton's own analysis of what each writes, and AOTAutograd's cache key covers both
    generated kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEC_CACHE"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", _DECOMPOSE], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"opaque": ["sparsec.triton_rsparse_linear_t.default"],
                   "kernels": [["rsparse_gemv", ["ACC"]], ["rsparse_out", ["Y"]]],
                   "hashed": ["rsparse_gemv", "rsparse_out"]}
