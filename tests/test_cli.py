"""The command line, on the tiny model (the real-model commands are exercised by make demo)."""

import json
import subprocess
import sys

from sparsec.cli import main


def test_passes_and_recipes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "activation_threshold" in out and "spark_topk" in out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(r in out for r in ("teal-25", "teal-40", "teal-50", "cats-50", "spark-50"))


def test_calibrate_report_eval(tmp_path, capsys):
    plan = tmp_path / "tiny.sparsec"
    assert main(["calibrate", "--model", "tiny-llama", "--recipe", "teal-50", "--out", str(plan), "--windows", "8", "--length", "64"]) == 0
    assert (plan / "plan.json").exists()
    capsys.readouterr()
    assert main(["report", str(plan), "--json", "--plot", str(tmp_path / "p.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["sites"] >= 10 and (tmp_path / "p.png").exists()
    assert main(["eval", "--model", "tiny-llama", "--plan", str(plan), "--windows", "2", "--length", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["recipe"] == "teal-50" and res["dense_ppl"] > 1 and res["sparse_ppl"] > 1 and res["windows"] == 2


def test_cli_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "sparsec.cli", "eval", "--model", "tiny-llama", "--recipe", "teal-45"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("sparsec: error: unknown recipe 'teal-45'")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparsec.cli", "report", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a sparsec plan" in r.stderr


def test_cli_unwraps_compile_errors_and_checks_counts(tmp_path, capsys, tiny_plan):
    import pytest

    import sparsec

    # a plan missing one of the model's sites: the backend's PlanError reaches the user as
    # one line, not as torch.compile's BackendCompilerFailed traceback
    sites = dict(tiny_plan.sites)
    sites.pop(sorted(sites)[0])
    path = sparsec.Plan(recipe=tiny_plan.recipe, sites=sites, tensors=tiny_plan.tensors).save(tmp_path / "p.sparsec")
    assert main(["eval", "--model", "tiny-llama", "--plan", str(path), "--windows", "1", "--length", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparsec: error:") and "has no site" in err[-1]
    assert not any("BackendCompilerFailed" in line for line in err)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "tiny-llama", "--windows", "0", "--out", str(tmp_path / "q")])
    assert exc.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
