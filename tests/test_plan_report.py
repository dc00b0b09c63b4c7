"""Plans round-trip through safetensors + JSON; a plan for another model is rejected; reports."""

import json
import warnings

import pytest
import torch

import sparsec
from sparsec.errors import PlanError
from sparsec.models.llama import tiny_llama
from tests.test_activation_threshold import masked_dense


def test_plan_round_trip(tmp_path, tiny, tiny_plan):
    path = tiny_plan.save(tmp_path / "tiny.sparsec")
    doc = json.loads((path / "plan.json").read_text())
    assert doc["format_version"] == 2  # tensors file named by its checksum (tests/test_plan_files.py)
    assert sorted(p.name for p in path.iterdir()) == [".plan.lock", "plan.json", doc["tensors"]["file"]]
    loaded = sparsec.Plan.load(path)
    assert loaded.sites == tiny_plan.sites and loaded.recipe == tiny_plan.recipe
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        out = torch.compile(tiny, backend="sparsec", options={"plan": str(path), "dense_backend": "eager"})(ids).logits
    torch.testing.assert_close(out, masked_dense(tiny, tiny_plan, ids), atol=1e-5, rtol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, holder):
        super().__init__()
        self.holder = holder

    def forward(self, ids):
        return self.holder["inner"](ids).logits


def test_plan_for_other_model_is_rejected(tiny_plan):
    narrow = tiny_llama(hidden_size=48)
    with pytest.raises(PlanError, match=r"site 'model.layers.0.self_attn.q_proj': weight has shape \[48, 48\] in this model but \[64, 64\] in the plan"):
        sparsec.export(narrow, (torch.randint(0, 256, (1, 5)),), plan=tiny_plan)
    wrapper = torch.nn.ModuleDict({"inner": tiny_llama()})  # the plan's model, one level down
    with pytest.raises(PlanError, match=r"has 'model.layers.0.self_attn.q_proj': it was calibrated on the module "
                                        r"that is 'holder.inner' here"):
        sparsec.export(_Logits(wrapper), (torch.randint(0, 256, (1, 5)),), plan=tiny_plan)
    deeper = tiny_llama(num_hidden_layers=3)
    with pytest.raises(Exception, match=r"the plan has no site 'model.layers.2.self_attn.q_proj'"):
        with torch.no_grad():
            torch.compile(deeper, backend="sparsec", options={"plan": tiny_plan})(torch.randint(0, 256, (1, 5)))


def test_bad_plan_paths(tmp_path, tiny_plan):
    with pytest.raises(PlanError, match="is not a sparsec plan"):
        sparsec.Plan.load(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PlanError, match="a file of that name exists"):
        tiny_plan.save(f)
    (tmp_path / "v9").mkdir()
    (tmp_path / "v9" / "plan.json").write_text(json.dumps({"format": "sparsec-plan", "format_version": 9}))
    with pytest.raises(PlanError, match="format version 9"):
        sparsec.Plan.load(tmp_path / "v9")


def test_damaged_plan_files_name_the_file(tmp_path, tiny_plan):
    """A plan folder damaged on disk gives a PlanError naming the file, not a KeyError or a
    safetensors traceback."""
    good = tiny_plan.save(tmp_path / "good")
    doc = json.loads((good / "plan.json").read_text())
    cases = {
        "list": b"[]",
        "binary": b"\xff\xfe\x00garbage",
        "no-sites": json.dumps({k: v for k, v in doc.items() if k != "sites"}).encode(),
        "sites-list": json.dumps({**doc, "sites": []}).encode(),
    }
    for name, content in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "plan.json").write_bytes(content)
        with pytest.raises(PlanError, match="plan.json"):
            sparsec.Plan.load(d)
    trunc = tmp_path / "truncated"  # a version-1 folder (no checksum to catch it first)
    trunc.mkdir()
    (trunc / "plan.json").write_text(json.dumps({**doc, "format_version": 1}))
    (trunc / "tensors.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(PlanError, match="tensors.safetensors.*cannot be read"):
        sparsec.Plan.load(trunc)


def test_report_of_plan_and_compiled_model(tmp_path, tiny, tiny_plan):
    rep = sparsec.report(tiny_plan)
    text = str(rep)
    assert "model.layers.0.mlp.down_proj" in text and "KiB/token dense" in text and "total (" in text
    data = json.loads(rep.to_json())
    rewritten = [k for k, e in tiny_plan.sites.items() if e["sparsity"] > 0]
    assert [r["site"] for r in data["sites"]] == rewritten
    assert data["totals"]["bytes_sparse"] < data["totals"]["bytes_dense"]
    png = rep.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fresh = tiny_llama()  # same shapes as `tiny`, never compiled before
    compiled = torch.compile(fresh, backend="sparsec", options={"plan": tiny_plan, "dense_backend": "eager"})
    assert "nothing rewritten yet" in str(sparsec.report(compiled))
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 6)))
    assert [r["site"] for r in json.loads(sparsec.report(compiled).to_json())["sites"]] == rewritten


def test_report_cats_bytes(tiny, tiny_batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, "cats-50", progress=False)
    row = json.loads(sparsec.report(plan).to_json())["sites"][0]
    # gate read densely (1/3 of the MLP bytes), up and down at (1 - measured sparsity)
    expected = row["bytes_dense"] / 3 + row["bytes_dense"] * 2 / 3 * (1 - row["measured"])
    assert row["bytes_sparse"] == pytest.approx(expected, rel=1e-3)


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tiny_plan, tmp_path):
    import sys

    from sparsec.errors import SparsecError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SparsecError, match=r"pip install 'sparsec\[plot\]'"):
        sparsec.report(tiny_plan).plot(tmp_path / "p.png")
