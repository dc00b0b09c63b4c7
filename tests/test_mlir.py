"""MLIR export through torch-mlir: N:M weights get a structured sparse encoding, thresholds are
elementwise ops, and a 2:4 linear compiled by MLIR's sparsifier runs and matches torch.

Tolerance: fp32, 1e-5 of the largest output: the sparsifier's loop sums in another order
than MKL (differences seen here ~1e-7 relative).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import ExportError

torch_mlir = pytest.importorskip("torch_mlir")
from sparsec.mlir_export import export_mlir, run_sparsified  # noqa: E402

RTOL = 1e-5


class MLP(nn.Module):
    """Odd sizes: 28 inputs (7 groups of 4), 20 hidden, 12 outputs; a ReLU between the linears
    (an elementwise producer feeding a sparse matmul: the case that needs the barrier)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28, 20)
        self.fc2 = nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _plan(model, x, recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsec.calibrate(model, [x], recipe, progress=False)


NM24 = {"nm_weights": {"n": 2, "m": 4, "method": "magnitude"}}
TEAL = {"activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform"}}


@pytest.mark.parametrize("passes", [NM24, {**NM24, **TEAL}], ids=["2:4", "2:4+teal"])
def test_sparsified_nm_linear_runs_and_matches_torch(passes):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 28)
    plan = _plan(model, x, {"passes": passes})
    module = export_mlir(model, (x,), plan=plan)
    text = str(module)
    assert text.count("sparse_tensor.convert") == 2  # both linears read their 2:4 weight sparsely
    assert "d1 mod 4 : structured[2, 4]" in text
    if "activation_threshold" in passes:
        assert "arith.cmpf" in text and "arith.select" in text  # the threshold as elementwise ops
    with torch.no_grad():
        ref = sparsec.export(model, (x,), plan=plan).module()(x)
        dense = model(x)
    assert str(export_mlir(model, (x,), plan=plan)) == text  # deterministic for the same plan
    got = run_sparsified(module, x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= RTOL * float(ref.abs().max())
    assert float((dense - ref).abs().max()) > 100 * RTOL * float(ref.abs().max())  # the mask matters


def test_export_mlir_on_tiny_llama_composition(tiny, tiny_batches, tmp_path):
    plan = _plan(tiny, tiny_batches[0], "sparsegpt-24-teal-40")
    path = tmp_path / "tiny.mlir"
    module = export_mlir(tiny, (tiny_batches[0],), plan=plan, path=path)
    text = path.read_text()
    assert text == str(module)
    # 2 layers x (q/k/v stacked, o, gate/up stacked, down): 8 N:M linears, all encoded
    assert text.count("sparse_tensor.convert") == 8
    assert "d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4]" in text
    assert "sparsec" not in text.split("{-#")[0]  # no custom op left: all standard dialects
    assert "linalg.generic" in text and not re.search(r"\btorch\.(aten|prim|vtensor|operator)", text)


def test_export_mlir_cats_is_elementwise(tiny, tiny_batches):
    plan = _plan(tiny, tiny_batches[0], "cats-50")
    text = str(export_mlir(tiny, (tiny_batches[0],), plan=plan))
    body = text.split("{-#")[0]
    assert "sparse_tensor" not in body  # no N:M here
    assert "arith.select" in body and "arith.cmpf" in body  # the threshold as compare + select
    assert not re.search(r"\btorch\.(aten|prim|vtensor|operator)", body)


def test_export_mlir_bad_path_and_no_change_to_model(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 28)
    plan = _plan(model, x, {"passes": NM24})
    with pytest.raises(ExportError, match="does not exist"):
        export_mlir(model, (x,), plan=plan, path=tmp_path / "missing" / "m.mlir")
    export_mlir(model, (x,), plan=plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_export_mlir(tmp_path):
    from sparsec.cli import main

    plan_dir = tmp_path / "p.sparsec"
    assert main(["calibrate", "--model", "tiny-llama", "--recipe", "magnitude-24", "--out", str(plan_dir),
                 "--windows", "2", "--length", "32", "--batch", "1"]) == 0
    out = tmp_path / "m.mlir"
    assert main(["export-mlir", "--model", "tiny-llama", "--plan", str(plan_dir), "--out", str(out)]) == 0
    assert "structured[2, 4]" in out.read_text()
