"""The shared C++ header ``kernels/csrc/sparsec_common.h`` and how kernels/cpu.py builds with it.

The threshold-vector collection (``active_rows_scaled``) has no op yet (R-Sparse will be its
first user): a small test-only extension built from the header exercises it next to the plain
``active_rows`` the activation kernels use, against a plain-torch reference. It is compiled with
the flags of this machine's kernels, so an AVX-512 machine tests the vector path, any other the
portable loop.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from sparsec.kernels import cpu

HOOK = r"""
#include <torch/extension.h>

#include "sparsec_common.h"

using namespace sparsec::cpu;

// (rows [nact] int64, coef [nact, B] fp32) of x [B, K], scalar threshold or threshold vector
std::tuple<at::Tensor, at::Tensor> collect(const at::Tensor& x, double thr, const c10::optional<at::Tensor>& scale) {
  check2d(x, "x");
  const int64_t B = x.size(0), K = x.size(1);
  sparsec_check_vector(scale, K, "active_rows", "scale");
  const at::Tensor s = scale ? scale->contiguous().to(at::kFloat) : at::Tensor();
  std::vector<int64_t> rows;
  std::vector<float> coef;
  auto run = [&](const auto* xp) {
    if (scale)
      active_rows_scaled(xp, B, K, s.data_ptr<float>(), (float)thr, rows, coef);
    else
      active_rows(xp, B, K, (float)thr, rows, coef);
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>());
  else
    run(x.data_ptr<c10::BFloat16>());
  const int64_t nact = static_cast<int64_t>(rows.size());
  auto r = at::empty({nact}, at::kLong);
  auto c = at::empty({nact, B}, at::kFloat);
  std::copy(rows.begin(), rows.end(), r.data_ptr<int64_t>());
  std::copy(coef.begin(), coef.end(), c.data_ptr<float>());
  return {r, c};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("collect", &collect, py::arg("x"), py::arg("threshold"), py::arg("scale") = py::none());
  m.def("isa", &isa_name);
}
"""


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    from torch.utils.cpp_extension import load_inline

    which = cpu.isa()
    digest = hashlib.sha256(HOOK.encode() + b"".join(h.read_bytes() for h in cpu.HEADERS)).hexdigest()[:12]
    return load_inline(name=f"sparsec_common_test_{which}_{digest}", cpp_sources=[HOOK],
                       extra_cflags=cpu.BASE_FLAGS + cpu.ISA_FLAGS[which], extra_ldflags=["-fopenmp"],
                       extra_include_paths=[str(cpu.INCLUDE_DIR)],
                       build_directory=str(tmp_path_factory.mktemp("sparsec_common")), verbose=False)


def reference(x: torch.Tensor, thr: float, scale: torch.Tensor | None = None):
    mag = x.float().abs() if scale is None else x.float().abs() * scale
    on = ~(mag <= thr)  # NaN (also inf * 0) stays active
    rows = on.any(0).nonzero().flatten()
    return rows, torch.where(on, x.float(), 0.0)[:, rows].t()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16, 17])  # 17: past the AVX-512 path's 16 rows
@pytest.mark.parametrize("k", [1, 37, 64])
def test_active_rows_with_a_threshold_vector(hook, dtype, batch, k):
    assert hook.isa() == cpu.isa()
    g = torch.Generator().manual_seed(batch * 100 + k)
    x = torch.randn(batch, k, generator=g).to(dtype)
    x[0, k // 2] = float("nan")
    x[-1, 0] = float("inf")
    scale = torch.rand(k, generator=g) * 2
    scale[0] = 0.0  # inf * 0: NaN, active
    if k > 2:
        scale[1] = 0.0  # finite * 0: inactive at any threshold >= 0
    for thr in (-1.0, 0.0, 0.6, 1e9):
        for s in (None, scale):
            rows, coef = hook.collect(x, thr, s)
            ref_rows, ref_coef = reference(x, thr, s)
            assert torch.equal(rows, ref_rows), (thr, s is not None)
            torch.testing.assert_close(coef, ref_coef, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match=r"scale must be \[%d\]" % k):
        hook.collect(x, 0.5, torch.ones(k + 1))


def test_sources_are_every_familys_and_headers_are_hashed(tmp_path, monkeypatch):
    """The build takes every ``kernels/<family>/csrc/*.cpp`` (sorted), names no family, and a
    change to a shared header changes the cache key (so it rebuilds)."""
    assert cpu.SOURCES == sorted(cpu.SOURCES) and cpu.SOURCES
    assert {f.parent.parent.name for f in cpu.SOURCES} == set(cpu._families())
    assert (cpu.INCLUDE_DIR / "sparsec_common.h") in cpu.HEADERS
    key = cpu._key("portable")[0]
    edited = tmp_path / "sparsec_common.h"
    edited.write_bytes(cpu.HEADERS[0].read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(cpu, "HEADERS", [edited, *cpu.HEADERS[1:]])
    assert cpu._key("portable")[0] != key
