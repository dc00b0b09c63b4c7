"""The generated Triton kernels, checked without a GPU two ways (DEVELOPERS.md):

1. run under ``TRITON_INTERPRET=1`` on CPU tensors against the reference, small odd shapes;
2. compiled ahead of time to cubins for sm_80 and sm_90 (Triton ships ptxas).

Tolerances: fp32 1e-4 (split-K sums in another order); bf16/fp16 two ulps of the output
(2^-7 / 2^-10 relative): both sides accumulate in fp32 and round once (CATS: per element too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsec.kernels import _triton  # noqa: E402
from sparsec.kernels import activation as A  # noqa: E402
from sparsec.kernels._triton.source import _MODULES  # noqa: E402
from sparsec.kernels.activation import triton as AT  # noqa: E402
from sparsec.kernels.nm import triton as NT  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 1.6e-2), torch.float16: (4e-3, 2e-3)}


@pytest.fixture
def interpret(monkeypatch, tmp_path):
    # conftest sets TRITON_INTERPRET=1 before anything imports triton (on machines without
    # a GPU): the interpreter must be chosen before triton's first import
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (conftest does on CPU machines)")
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path))
    yield
    _MODULES.clear()


def _between(v: torch.Tensor, s: float) -> float:
    """A threshold half-way between two neighbouring |v| values near the s-quantile: the
    kernel computes the activation itself, and a value sitting exactly on the threshold could
    flip on a one-ulp difference from torch's."""
    a = v.float().abs().flatten().sort().values
    i = min(int(s * (len(a) - 1)), len(a) - 2)
    return float((a[i] + a[i + 1]) / 2)


def _close(got, ref, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol * scale, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,k,n", [(1, 100, 77), (3, 131, 67), (16, 70, 130)])
def test_sparse_linear_interpreted(interpret, dtype, batch, k, n):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(batch, k, generator=g).to(dtype)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    res = torch.randn(batch, n, generator=g).to(dtype)
    t = float(torch.quantile(x.float().abs().flatten(), 0.6))
    _close(AT.sparse_linear_cuda(x, wt, None, t), A.sparse_linear_reference(x, wt, None, t), dtype)
    # fused bias + residual epilogue
    _close(AT.sparse_linear_cuda(x, wt, b, t, residual=res), A.sparse_linear_reference(x, wt, b, t) + res, dtype, 2)


def test_sparse_linear_interpreted_edges(interpret):
    x = torch.randn(2, 50)
    wt = torch.randn(50, 40)
    b = torch.randn(40)
    # sparsity 1: every program returns early, y is the bias; sparsity 0: the dense product
    assert torch.equal(AT.sparse_linear_cuda(x, wt, b, float("inf")), b.expand(2, 40))
    _close(AT.sparse_linear_cuda(x, wt, b, -1.0), x @ wt + b, torch.float32)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    got, ref = AT.sparse_linear_cuda(x, wt, None, 0.5), A.sparse_linear_reference(x, wt, None, 0.5)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[0]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_cats_interpreted(interpret, dtype, act):
    g = torch.Generator().manual_seed(3)
    h, i, o, batch = 70, 131, 45, 3  # output size o != input size h (a plain MLP)
    x = torch.randn(batch, h, generator=g).to(dtype)
    wg, wu = [(torch.randn(i, h, generator=g) / h**0.5).to(dtype) for _ in range(2)]
    wd = (torch.randn(o, i, generator=g) / i**0.5).to(dtype)
    bu, bd = torch.randn(i, generator=g).to(dtype), torch.randn(o, generator=g).to(dtype)
    a = A.ACTIVATIONS[act](torch.nn.functional.linear(x, wg))
    t = _between(a, 0.5)
    got = AT.sparse_cats_mlp_cuda(x, wg, None, wu, bu, wd.t().contiguous(), bd, t, act)
    ref = A.cats_mlp_reference(x, wg, None, wu, bu, wd, bd, t, act)
    _close(got, ref, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,t", [(2, 4, -1.0), (2, 4, 0.5), (4, 8, -1.0), (1, 4, 0.3)])
def test_nm_linear_interpreted(interpret, dtype, n, m, t):
    from sparsec.kernels import nm

    g = torch.Generator().manual_seed(m)
    w = (torch.randn(67, 96, generator=g) / 10).to(dtype)
    keep = nm.nm_mask(w.abs(), n, m)
    v, p = nm.pack(w, keep, n, m)
    x = torch.randn(3, 96, generator=g).to(dtype)
    b = torch.randn(67, generator=g).to(dtype)
    _close(NT.nm_linear_cuda(x, v, p, b, n, m, t), nm.nm_linear_reference(x, v, p, b, n, m, t), dtype)


def test_generated_source_is_specialised_and_dumped(interpret, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEC_DEBUG", str(tmp_path / "dbg"))
    spec = _triton.SiteSpec("sparse_linear", torch.bfloat16, 1000, 4099, has_bias=True)
    _triton.generate(spec)
    src = (tmp_path / "dbg" / "kernels" / f"{spec.name}.py").read_text()
    assert "offs_k < 1000" in src and "offs_n < 4099" in src and "DT = tl.bfloat16" in src
    cuda_src = _triton.render(spec, arch=9)
    assert cuda_src.count("triton.Config(") == len(AT.CONFIGS[9]) + 0 and "tl.dot(xs, w, out_dtype=tl.float32)" in cuda_src


_AOT = """
import json, torch
from sparsec.kernels import _triton
from sparsec.kernels.activation.triton import CatsSpec
from sparsec.kernels.nm.triton import NMSpec
specs = [
    (_triton.SiteSpec("sparse_linear", torch.bfloat16, 1000, 4099, has_bias=True, has_residual=True), (80, 90)),
    (_triton.SiteSpec("sparse_linear", torch.float16, 576, 1536), (90,)),
    (CatsSpec("sparse_cats_mlp", torch.bfloat16, 576, 576, inter=1536, activation="silu"), (80, 90)),
    (NMSpec("nm_linear", torch.bfloat16, 4096, 11008, nm=(2, 4), thresholded=True), (80, 90)),
]
out = []
for spec, ccs in specs:
    for cc in ccs:
        res = _triton.aot_compile(spec, cc)
        out.append({"name": spec.name, "cc": cc, "kernels": {k: [c[:4].hex() for c in v] for k, v in res.items()}})
print(json.dumps(out))
"""


def test_aot_cubin(tmp_path):
    """Every kernel of each site, in every autotune config of its architecture, compiles to a
    cubin for sm_80 / sm_90. In a fresh process without TRITON_INTERPRET: Triton cannot mix
    interpreted and compiled kernels in one process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEC_CACHE"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(o["name"].split("_cuda")[0], o["cc"]) for o in out] == [
        ("sparse_linear_bfloat16_k1000_n4099_bias_res", 80), ("sparse_linear_bfloat16_k1000_n4099_bias_res", 90),
        ("sparse_linear_float16_k576_n1536", 90),
        ("sparse_cats_mlp_bfloat16_k576_n576_i1536", 80), ("sparse_cats_mlp_bfloat16_k576_n576_i1536", 90),
        ("nm_linear_bfloat16_k4096_n11008_2of4", 80), ("nm_linear_bfloat16_k4096_n11008_2of4", 90)]
    for o in out:
        arch = 9 if o["cc"] >= 90 else 8
        if "nm_linear" in o["name"]:
            assert set(o["kernels"]) == {"nm_gemv", "epilogue"}
            assert len(o["kernels"]["nm_gemv"]) == len(NT.NM_CONFIGS[arch])
        else:
            expect = {"sparse_gemv", "epilogue"} | ({"cats_up"} if "cats" in o["name"] else set())
            assert set(o["kernels"]) == expect
            assert len(o["kernels"]["sparse_gemv"]) == len(AT.CONFIGS[arch])
        for kname, heads in o["kernels"].items():
            assert heads and all(h == "7f454c46" for h in heads), (o["name"], kname)  # ELF cubins


# ---- the triton_op twins: what Inductor and torch.export see on a GPU ------------------------


def test_triton_op_twins_run_eagerly(interpret):
    """Each twin computes what its opaque op does: the Triton GEMV up to 16 rows, the opaque
    op's path (here the CPU kernel) above -- so swapping one for the other changes no result."""
    from sparsec.kernels import nm

    g = torch.Generator().manual_seed(5)
    wt, b = torch.randn(61, 43, generator=g) / 8, torch.randn(43, generator=g)
    for rows in (3, 17):
        x, res = torch.randn(rows, 61, generator=g), torch.randn(rows, 43, generator=g)
        got = torch.ops.sparsec.triton_sparse_linear(x, wt, b, 0.4, None, res, [])
        _close(got, A.sparse_linear_reference(x, wt, b, 0.4) + res, torch.float32, 2)
    wg, wu = torch.randn(90, 61, generator=g) / 8, torch.randn(90, 61, generator=g) / 8
    wdt = torch.randn(90, 43, generator=g) / 9
    x = torch.randn(2, 61, generator=g)
    got = torch.ops.sparsec.triton_sparse_cats_mlp(x, wg, None, wu, None, wdt, b, 0.2, "silu")
    _close(got, A.sparse_cats_mlp_reference(x, wg, None, wu, None, wdt, b, 0.2, "silu"), torch.float32, 4)
    w = torch.randn(43, 64, generator=g) / 8
    v, p = nm.pack(w, nm.nm_mask(w.abs(), 2, 4), 2, 4)
    x = torch.randn(3, 64, generator=g)
    _close(torch.ops.sparsec.triton_nm_linear(x, v, p, b, 2, 4, -1.0), nm.nm_linear_reference(x, v, p, b, 2, 4, -1.0),
           torch.float32)


def test_use_triton_ops_swaps_only_cuda_sites():
    """codegen.lower calls this when a GPU is present: the prepared ops of CUDA nodes become
    their triton_op twins, CPU nodes keep the opaque op (and with it the C++ kernel)."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.Graph()
    outs = []
    with FakeTensorMode():
        for dev in ("cpu", "cuda"):
            x, wt = graph.placeholder(f"x_{dev}"), graph.placeholder(f"wt_{dev}")
            node = graph.call_function(torch.ops.sparsec.sparse_linear.default, (x, wt, None, 0.5))
            node.meta["val"] = torch.empty(2, 7, device=dev)
            outs.append(node)
        other = graph.call_function(torch.ops.aten.relu.default, (outs[1],))
        other.meta["val"] = torch.empty(2, 7, device="cuda")
    graph.output(tuple(outs) + (other,))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert NT.use_triton_ops(gm) == 0  # each family swaps its own ops only
    assert AT.use_triton_ops(gm) == 1
    assert outs[0].target is torch.ops.sparsec.sparse_linear.default
    assert outs[1].target is torch.ops.sparsec.triton_sparse_linear.default
    assert outs[1].args[4:] == (None, None) and outs[1].kwargs == {"group_weights": []}
    assert other.target is torch.ops.aten.relu.default
    assert "triton_sparse_linear" in gm.code


def test_each_family_lowering_swaps_its_own_twins():
    """The families register their twins through the lowering seam: core's ``lower`` calls each
    ``Lowering.triton`` (on a GPU machine), and each swaps the CUDA nodes of its own op."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsec.plugins import get_registry

    ops = {"sparse_linear": 4, "sparse_cats_mlp": 9, "nm_linear": 7}  # op -> its positional arguments
    graph = fx.Graph()
    nodes = {}
    with FakeTensorMode():
        for op, nargs in ops.items():
            args = tuple(graph.placeholder(f"{op}_{i}") for i in range(nargs))
            nodes[op] = graph.call_function(getattr(torch.ops.sparsec, op).default, args)
            nodes[op].meta["val"] = torch.empty(2, 7, device="cuda")
    graph.output(tuple(nodes.values()))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    lowerings = get_registry().lowerings
    for op in ops:
        assert lowerings[f"sparsec::{op}"].triton(gm) == 1, op
        assert nodes[op].target is getattr(torch.ops.sparsec, f"triton_{op}").default
    assert [n.target for n in nodes.values()] == [getattr(torch.ops.sparsec, f"triton_{op}").default for op in ops]


def test_triton_gen_shim_keeps_old_names():
    """``sparsec.kernels.triton_gen`` (deprecated) still gives every name it had, now the
    objects of ``_triton`` and the families' ``triton`` modules."""
    from sparsec.kernels import triton_gen as tg

    assert tg.generate is _triton.generate and tg.aot_compile is _triton.aot_compile
    assert tg.sparse_linear_cuda is AT.sparse_linear_cuda and tg.nm_linear_cuda is NT.nm_linear_cuda
    assert tg.CONFIGS is AT.CONFIGS and tg.NM_CONFIGS is NT.NM_CONFIGS and tg._MODULES is _MODULES
    assert tg.MAX_BATCH == 16 and tg._launch is _triton.launch and tg._epilogue is _triton.run_epilogue
    assert tg.TRITON_TWINS == {"sparse_linear": "triton_sparse_linear", "sparse_cats_mlp": "triton_sparse_cats_mlp",
                               "nm_linear": "triton_nm_linear"}
    # the old all-families SiteSpec signature builds the family's spec, named as before
    assert tg.SiteSpec("sparse_cats_mlp", torch.bfloat16, 576, 576, inter=1536, activation="silu") == AT.CatsSpec(
        "sparse_cats_mlp", torch.bfloat16, 576, 576, inter=1536, activation="silu")
    nm_spec = tg.SiteSpec("nm_linear", torch.bfloat16, 4096, 11008, has_bias=True, nm=(2, 4), activation="threshold")
    assert nm_spec == NT.NMSpec("nm_linear", torch.bfloat16, 4096, 11008, has_bias=True, nm=(2, 4), thresholded=True)
    assert nm_spec.name.rsplit("_", 1)[0] == "nm_linear_bfloat16_k4096_n11008_2of4_bias"
    assert set(tg._signatures(nm_spec)) == {"nm_gemv", "epilogue"}


_DECOMPOSE = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from sparsec.kernels import nm
import sparsec.kernels.activation.triton, sparsec.kernels.nm.triton  # the triton_op twins

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
        self.wg, self.wu = torch.randn(90, 43, generator=g), torch.randn(90, 43, generator=g)
        self.wdt = torch.randn(90, 43, generator=g)
        w = torch.randn(43, 64, generator=g)
        self.v, self.p = nm.pack(w, nm.nm_mask(w.abs(), 2, 4), 2, 4)
    def forward(self, x, r, x2):
        y = torch.ops.sparsec.triton_sparse_linear(x, self.wt, self.b, 0.4, None, r, [])
        y = torch.ops.sparsec.triton_sparse_cats_mlp(y, self.wg, None, self.wu, None, self.wdt, None, 0.1, "silu")
        return torch.ops.sparsec.triton_nm_linear(x2, self.v, self.p, None, 2, 4, 0.3) + y

ep = torch.export.export(M(), (torch.randn(3, 61), torch.randn(3, 43), torch.randn(3, 64)))
opaque = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
dec = ep.run_decompositions(decompose_custom_triton_ops=True)
kernels = []
for n in dec.graph.nodes:
    if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
        k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
        kernels.append([getattr(k, "fn", k).__name__, sorted(n.kwargs.get("tensors_to_clone", []))])
# what AOTAutograd's cache key hashes for each twin: the sources of the kernels it launches
from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCacheDetails
hashed = {str(n.target): sorted(getattr(k, "fn", k).__name__ for k in
                                torch._library.triton.get_triton_kernels_for_op(n.target._name))
          for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsec.")}
details = object.__new__(AOTAutogradCacheDetails)  # only its kernel-source walk is used
srcs = details.get_triton_source_codes_from_gm(ep.graph_module)
hashed["specialised"] = [any(f"K={k}, N={n}" in src for src in srcs) for k, n in ((61, 43), (90, 43))]
print(json.dumps({"opaque": opaque, "kernels": kernels, "hashed": hashed}))
"""


def test_triton_ops_decompose_into_kernels(tmp_path):
    """What Inductor does with a triton_op on a GPU, done on CPU: export keeps the twins as
    ops; decomposing them (Inductor always does) yields one user-defined-kernel node per
    launch, with Triton's own analysis of which arguments each kernel writes. Triton only
    needs a target here (sm_90), not a device; in a fresh process without TRITON_INTERPRET
    (the interpreter's kernels cannot be traced)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEC_CACHE"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", _DECOMPOSE], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    twins = [o for o in out["opaque"] if o.startswith("sparsec.")]
    assert twins == ["sparsec.triton_sparse_linear.default", "sparsec.triton_sparse_cats_mlp.default",
                     "sparsec.triton_nm_linear.default"]
    assert out["kernels"] == [
        ["sparse_gemv", ["ACC"]], ["epilogue", ["Y"]],  # linear: GEMV into the fp32 accumulator, epilogue
        ["cats_up", ["HOUT"]], ["sparse_gemv", ["ACC"]], ["epilogue", ["Y"]],  # CATS: up stage, down GEMV
        ["nm_gemv", ["ACC"]], ["epilogue", ["Y"]],
    ]
    # AOTAutograd's cache key covers the generated sources (specialised: each site's K and N)
    assert out["hashed"] == {
        "sparsec.triton_sparse_linear.default": ["epilogue", "sparse_gemv"],
        "sparsec.triton_sparse_cats_mlp.default": ["cats_up", "epilogue", "sparse_gemv"],
        "sparsec.triton_nm_linear.default": ["epilogue", "nm_gemv"],
        "specialised": [True, True],
    }
