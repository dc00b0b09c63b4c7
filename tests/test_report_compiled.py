"""``sparsec.report(compiled)``: every rewritten site of every graph of the compiled object as
of its latest compile (prefill and decode graphs, graphs around a break, passes that need no
calibration), and none from earlier compiles; rows come from the passes."""

import json
import warnings

import torch

import sparsec
from sparsec.models.llama import tiny_llama


def sites_of(compiled):
    return {r["site"]: r for r in json.loads(sparsec.report(compiled).to_json())["sites"]}


def test_report_shows_all_graphs_of_the_latest_compile_only(tiny_plan):
    m = tiny_llama()
    mlp_only = {"recipe": {"passes": {"activation_threshold": {"mode": "teal", "sparsity": 0.4, "allocation": "uniform",
                                                               "targets": ["mlp"]}}}, "dense_backend": "eager"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = torch.compile(m, backend="sparsec", options={"plan": tiny_plan, "dense_backend": "eager"})
        first(torch.randint(0, 256, (1, 6)))
        first(torch.randint(0, 256, (1, 1)))  # a second (decode-shaped) graph of the same compile
        all_sites = sites_of(first)
        assert set(all_sites) == {k for k, e in tiny_plan.sites.items() if e["sparsity"] > 0}
        assert all(r["bytes_sparse"] < r["bytes_dense"] for r in all_sites.values())
        second = torch.compile(m, backend="sparsec", options=mlp_only)
        second(torch.randint(0, 256, (1, 6)))
    latest = sites_of(second)
    # the latest compile only: its MLP sites; none of the first compile's attention sites
    assert latest and all(".mlp." in k for k in latest)
    assert set(sites_of(first)) == set(latest)  # the model's latest compile, whichever handle asks


def test_report_shows_passes_that_need_no_calibration():
    m = tiny_llama()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = torch.compile(m, backend="sparsec", options={"recipe": "spark-50", "dense_backend": "eager"})
        c(torch.randint(0, 256, (1, 5)))
    rows = sites_of(c)
    assert "model.layers.0.mlp.down_proj" in rows and rows["model.layers.0.mlp.down_proj"]["pass"] == "spark_topk"
    assert rows["model.layers.0.mlp.down_proj"]["target"] == 0.5
