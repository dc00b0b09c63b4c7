"""Reliability (issue 15): the C++ kernel cache survives killed builds and damaged files, every
wait for a build is bounded, ``--help`` works everywhere, and bad input gets one line naming
the file, site or key (never a traceback).

The build tests run ``kernels.cpu.extension()`` in subprocesses (bounded by ``timeout=``) on
a tiny stand-in source (a Python module with no torch headers, built in about a second)
instead of the real kernels (35-40 s), in a private ``SPARSEC_CACHE``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.cli import build_parser, main

# ---- kernel builds ---------------------------------------------------------------------------

FAKE_SOURCE = r"""
// stands in for sparsec's kernels: a module with register_ops() and answer(), no torch headers
#include <Python.h>
#define SPX_CAT(a, b) a##b
#define SPX_XCAT(a, b) SPX_CAT(a, b)
#define SPX_STR(a) #a
#define SPX_XSTR(a) SPX_STR(a)
static PyObject* register_ops(PyObject*, PyObject*) { Py_RETURN_NONE; }
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"register_ops", register_ops, METH_NOARGS, ""},
                                {"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, SPX_XSTR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC SPX_XCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""

CHILD = r"""
import json, sys
from pathlib import Path
from sparsec.kernels import cpu
cpu.SOURCES = [Path(sys.argv[1])]
m = cpu.extension()
print(json.dumps({"ok": m is not None and m.answer() == 42, **cpu.build_info().get(cpu.isa(), {})}))
"""

#: a bound on one child (torch import + a one-second build) on a loaded 2-core machine; the
#: failures these tests catch waited forever
CHILD_TIMEOUT = 150


@pytest.fixture
def fake(tmp_path):
    src = tmp_path / "fake_kernels.cpp"
    src.write_text(FAKE_SOURCE)
    cache = tmp_path / "cache"
    env = {**os.environ, "SPARSEC_CACHE": str(cache), "SPARSEC_CPU_ISA": "portable"}
    env.pop("SPARSEC_BUILD_LOCK_TIMEOUT", None)
    return src, cache / "ext", env


def _child(src: Path, env: dict, timeout: float = CHILD_TIMEOUT) -> tuple[dict, str]:
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, str(src)], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the kernel load did not finish within {timeout} s (waiting forever?): "
                    f"{(exc.stderr or b'')[-2000:]!r}")
    assert r.returncode == 0, f"rc {r.returncode} (-7 is SIGBUS): {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _key(src: Path) -> str:
    from sparsec.kernels import cpu

    saved = cpu.SOURCES
    cpu.SOURCES = [src]
    try:
        return cpu._key("portable")[0]
    finally:
        cpu.SOURCES = saved


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_build_killed_midway_leaves_nothing_that_blocks_the_next(fake, tmp_path, sig):
    """A first build killed while the compiler runs (its whole process group, as a closed
    terminal or a CI timeout does) must not leave a lock that makes the next process wait
    forever: torch's FileBaton ``lock`` file used to stay in the shared build folder."""
    src, ext, env = fake
    slow = tmp_path / "slow-c++"  # the compile step sleeps, so the kill lands mid-build
    slow.write_text('#!/bin/sh\nfor a in "$@"; do if [ "$a" = "-c" ]; then sleep 120; fi; done\n'
                    'exec "$SPARSEC_TEST_REAL_CXX" "$@"\n')
    slow.chmod(0o755)
    first = subprocess.Popen([sys.executable, "-c", CHILD, str(src)], start_new_session=True,
                             env={**env, "CXX": str(slow), "SPARSEC_TEST_REAL_CXX": os.environ.get("CXX", "c++")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not any(ext.rglob("build.ninja")):  # written once torch's FileBaton is taken
            assert first.poll() is None, "the first build ended before it could be killed"
            assert time.monotonic() < deadline, "the first build never started"
            time.sleep(0.2)
        time.sleep(1.0)  # into the compile step
        os.killpg(first.pid, sig)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    t0 = time.monotonic()
    info, _ = _child(src, env)
    assert info["ok"] and not info["cached"] and time.monotonic() - t0 < CHILD_TIMEOUT
    published = Path(info["path"])
    assert published.parent == ext / _key(src) and (published.parent / "build.json").is_file()
    assert sorted(p.name for p in published.parent.iterdir()) == sorted(["build.json", published.name])
    info, _ = _child(src, env)
    assert info["ok"] and info["cached"]


def test_stale_lock_folder_of_an_older_build_is_replaced(fake):
    """The state the old layout left after a killed build: ``ext/<key>/lock`` with no shared
    object. The next process must build instead of waiting on it."""
    src, ext, env = fake
    old = ext / _key(src)
    old.mkdir(parents=True)
    (old / "lock").write_text("")
    (old / "build.ninja").write_text("# unfinished\n")
    info, err = _child(src, env)
    assert info["ok"] and not info["cached"] and "rebuilding" in err and str(old) in err
    assert not (old / "lock").exists() and (old / "build.json").is_file()


@pytest.mark.parametrize("damage", ["truncated", "empty", "manifest"])
def test_damaged_cached_kernels_are_rebuilt(fake, damage):
    """A truncated shared object crashed every later process with SIGBUS (importing maps
    pages past its end); an empty one failed to load forever (a permanent slow fallback).
    The load checks size and sha256 first, and rebuilds a damaged build with a warning."""
    src, ext, env = fake
    info, _ = _child(src, env)
    assert info["ok"] and not info["cached"]
    so = Path(info["path"])
    if damage == "manifest":
        target = so.parent / "build.json"
        target.write_text(target.read_text()[:20])
    else:
        target = so
        size = so.stat().st_size
        with open(so, "r+b") as f:
            f.truncate(size // 2 if damage == "truncated" else 0)
    info, err = _child(src, env)
    assert info["ok"] and not info["cached"]
    assert "rebuilding" in err and str(target) in err  # says what was wrong, naming the file
    assert Path(info["path"]).stat().st_size > 0
    info, _ = _child(src, env)
    assert info["ok"] and info["cached"]


def test_lock_wait_is_bounded_and_says_what_it_waits_for(fake):
    """Another process holding the build lock (hung, or stopped) delays a load by at most
    SPARSEC_BUILD_LOCK_TIMEOUT seconds, and the wait names the lock; the process then builds
    privately. Private build folders of processes that died over an hour ago are removed."""
    from filelock import FileLock

    src, ext, env = fake
    ext.mkdir(parents=True)
    dead = ext / f".build-{_key(src)}-dead"  # a killed build's private folder, two hours old
    dead.mkdir()
    (dead / "lock").write_text("")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    recent = ext / f".build-{_key(src)}-recent"  # maybe still building: kept
    recent.mkdir()
    lock_path = ext / f"{_key(src)}.lock"
    lock = FileLock(str(lock_path))
    lock.acquire()
    try:
        t0 = time.monotonic()
        info, err = _child(src, {**env, "SPARSEC_BUILD_LOCK_TIMEOUT": "3"})
        waited = time.monotonic() - t0
    finally:
        lock.release()
    assert info["ok"] and not info["cached"] and waited < CHILD_TIMEOUT
    assert f"waiting up to 3 s for its lock {lock_path}" in err and "building the portable CPU kernels privately" in err
    assert not dead.exists() and recent.exists()


# ---- --help ---------------------------------------------------------------------------------

def _subcommands() -> list[str]:
    ap = build_parser()
    sub = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_help_of_sparsec_and_every_subcommand(capsys):
    """``sparsec --help`` crashed (a ``%`` in a help string); every subcommand's too."""
    r = subprocess.run([sys.executable, "-m", "sparsec.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: sparsec" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
    cmds = _subcommands()
    assert {"calibrate", "report", "eval", "export-onnx", "export-mlir", "demo", "passes", "recipes"} <= set(cmds)
    assert all(c in r.stdout for c in cmds)
    for cmd in cmds:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0, cmd
        assert f"usage: sparsec {cmd}" in capsys.readouterr().out


# ---- bad input: one line naming the file, site or key; exit code != 0; no traceback ---------

def _error(argv, capsys) -> str:
    """Run the CLI in this process; the last stderr line, which must be the whole error."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsec: error: "), err
    return last


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A saved tiny Llama and damaged copies of it."""
    import shutil

    from sparsec.models.llama import tiny_llama

    root = tmp_path_factory.mktemp("hf")
    good = root / "good"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama().save_pretrained(good)
    (root / "no_weights").mkdir()
    shutil.copy(good / "config.json", root / "no_weights" / "config.json")
    (root / "bad_config").mkdir()
    shutil.copy(good / "model.safetensors", root / "bad_config" / "model.safetensors")
    (root / "bad_config" / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    (root / "no_model_type").mkdir()
    shutil.copy(good / "model.safetensors", root / "no_model_type" / "model.safetensors")
    (root / "no_model_type" / "config.json").write_text("{}")
    (root / "truncated").mkdir()
    shutil.copy(good / "config.json", root / "truncated" / "config.json")
    data = (good / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "no_config").mkdir()
    return root


def test_hf_folder_errors_name_the_folder_or_file(hf_folders, tmp_path, capsys):
    out = str(tmp_path / "p.sparsec")
    cases = {
        "no_weights": "has no weights",
        "bad_config": "config.json' is not valid JSON",
        "no_model_type": "has no 'model_type' key",
        "truncated": "cannot load the model in",
        "no_config": "has no config.json",
    }
    for name, expect in cases.items():
        folder = str(hf_folders / name)
        line = _error(["calibrate", "--model", folder, "--out", out], capsys)
        assert expect in line and folder in line, line
    line = _error(["calibrate", "--model", str(hf_folders / "no_weights" / "config.json"), "--out", out], capsys)
    assert "is a file" in line


def test_report_plot_to_an_unwritable_place(tiny_plan, tmp_path, capsys):
    plan = str(tiny_plan.save(tmp_path / "p.sparsec"))
    (tmp_path / "afile").write_text("x")
    for target, expect in (("/proc/sparsec-plot.png", "'/proc' is not writable"),
                           (str(tmp_path / "afile" / "p.png"), "is not a directory"),
                           (str(tmp_path / "missing" / "p.png"), "does not exist"),
                           (str(tmp_path), "is a directory")):
        line = _error(["report", plan, "--plot", target], capsys)
        assert target in line and expect in line, line
    # the API names the file as well (matplotlib's own error did not)
    with pytest.raises(sparsec.SparsecError, match="cannot write the plot to '/proc/p.png'"):
        sparsec.report(tiny_plan).plot("/proc/p.png")
    with pytest.raises(sparsec.SparsecError, match="afile' is not a directory"):
        sparsec.report(tiny_plan).plot(tmp_path / "afile" / "p.png")


def test_recipe_file_that_is_binary_or_a_directory(tmp_path):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    r = subprocess.run([sys.executable, "-m", "sparsec.cli", "calibrate", "--model", "tiny-llama", "--recipe",
                        str(binary), "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsec: error: recipe file") and str(binary) in last and "not UTF-8" in last, last
    folder = tmp_path / "recipes"
    folder.mkdir()
    with pytest.raises(sparsec.RecipeError, match="is a directory"):
        sparsec.resolve_recipe(str(folder) + os.sep)
    with pytest.raises(sparsec.RecipeError, match="is a directory"):
        sparsec.resolve_recipe(tmp_path / "recipes")  # a Path holds the separator in its str()


def test_export_takes_a_bare_tensor(tiny, tiny_plan, tiny_batches):
    ids = tiny_batches[0]
    ep = sparsec.export(tiny, ids, plan=tiny_plan)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids).logits, sparsec.export(tiny, (ids,), plan=tiny_plan).module()(ids).logits)


def test_calibrate_checks_out_before_calibrating(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("calibrated before checking --out")

    monkeypatch.setattr(sparsec, "calibrate", boom)
    monkeypatch.setattr("sparsec.models.llama.load_model", boom)
    (tmp_path / "afile").write_text("x")
    for out, expect in (("/proc/sparsec.plan", "'/proc' is not writable"),
                        (str(tmp_path / "afile"), "a file of that name exists"),
                        (str(tmp_path / "afile" / "p.sparsec"), "is not a directory")):
        line = _error(["calibrate", "--model", "tiny-llama", "--out", out], capsys)
        assert out in line and expect in line, line


def test_eval_checks_the_plan_against_the_model_first(tmp_path, capsys, monkeypatch):
    """A plan made for another model fails on the first compiled window, before the dense
    perplexity (minutes on a real model) is computed."""
    import sparsec.evaluate as ev
    from sparsec.models.llama import tiny_llama

    other = tiny_llama(hidden_size=32, intermediate_size=72)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(other, [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)],
                                 "teal-40-uniform", progress=False)
    path = str(plan.save(tmp_path / "other.sparsec"))
    seen = []
    real = ev.perplexity

    def spy(fn, windows, progress=False, desc="perplexity"):
        seen.append(desc)
        return real(fn, windows, progress, desc)

    monkeypatch.setattr(ev, "perplexity", spy)
    line = _error(["eval", "--model", "tiny-llama", "--plan", path, "--windows", "1", "--length", "16"], capsys)
    assert "has shape" in line and "site 'model.layers.0" in line, line
    assert not any("dense" in d for d in seen), seen


def test_export_onnx_refuses_size_1_axes_it_cannot_keep_dynamic(tiny, tiny_plan, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export-onnx", "--model", "tiny-llama", "--plan", "x", "--out", str(tmp_path / "m.onnx"),
              "--length", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--length: must be at least 2" in err and "Traceback" not in err
    for ids in (torch.tensor([[5]]), torch.tensor([[5, 6, 7]]), torch.tensor([[5], [6]])):
        with pytest.raises(sparsec.ExportError, match=r"input 'input_ids' has size 1 on axis \d"):
            sparsec.export_onnx(tiny, ids, tmp_path / "m.onnx", plan=tiny_plan, progress=False)
    assert not (tmp_path / "m.onnx").exists()


def test_demo_plan_goes_under_sparsec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / "cache"))
    assert build_parser().parse_args(["demo"]).plan_out == str(tmp_path / "cache" / "demo-teal-40.sparsec")
    monkeypatch.setenv("SPARSEC_CACHE", "")
    default = os.path.join(os.path.expanduser("~"), ".cache", "sparsec", "demo-teal-40.sparsec")
    assert build_parser().parse_args(["demo"]).plan_out == default


def test_unexpected_errors_and_interrupts_are_one_line(monkeypatch, capsys):
    """Even a bug or Ctrl-C gives one line, not a traceback (SPARSEC_TRACEBACK=1 re-raises)."""
    import sparsec.cli as cli

    def bug(a):
        raise RuntimeError("something broke\nacross lines")

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_passes", bug)
    assert main(["passes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsec: internal error: RuntimeError: something broke across lines "
                   "(SPARSEC_TRACEBACK=1 shows the traceback; please report it)"]
    monkeypatch.setenv("SPARSEC_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["passes"])
    monkeypatch.setattr(cli, "cmd_passes", interrupted)
    assert main(["passes"]) == 130 and capsys.readouterr().err.strip() == "sparsec: interrupted"
