"""Plan files: atomic, locked saves and entries/tensors checked at load (issue 15, items 4 and 7).

Every test here failed before plans were checked at load and saved atomically:

- a save killed at a random moment, or two saves at once, left a ``plan.json`` beside the other
  plan's tensors (a mix that loaded without error);
- a full disk destroyed the old plan and let a raw ``SafetensorError`` escape;
- out-of-range or repeated N:M positions, NaN / infinite / negative thresholds, tensors of the
  wrong dtype or shape and flipped bytes all loaded without complaint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.errors import PlanError

SAVE_CHILD = textwrap.dedent(
    """
    import sys, torch
    from sparsec.plan import Plan
    path, which, numel, count = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
    plans = [Plan(recipe={"name": "plan-" + w}, meta={"which": w},
                  tensors={"blob": torch.full((numel,), float(w)), "tail": torch.full((3,), float(w))})
             for w in which]
    print("ready", flush=True)
    i = 0
    while count < 0 or i < count:
        plans[i % len(plans)].save(path)
        i += 1
    """
)


def _marked_plan(which: str, numel: int = 1000) -> sparsec.Plan:
    return sparsec.Plan(recipe={"name": f"plan-{which}"}, meta={"which": which},
                        tensors={"blob": torch.full((numel,), float(which)), "tail": torch.full((3,), float(which))})


def _assert_whole(plan: sparsec.Plan) -> str:
    """The plan is one of the marked plans, whole: its JSON and its tensors come from one save."""
    which = plan.meta["which"]
    assert plan.recipe == {"name": f"plan-{which}"}
    for name in ("blob", "tail"):
        t = plan.tensors[name]
        assert bool((t == float(which)).all()), f"plan.json of plan {which} beside the tensors of another plan"
    return which


def _child(path: Path, which: str, numel: int, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAVE_CHILD, str(path), which, str(numel), str(count)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPARSEC_DISABLE_PLUGIN_AUTOLOAD": "1"})


def _stray_files(path: Path) -> list[str]:
    """Files in a plan folder besides plan.json, the one tensors file it names, and the lock."""
    doc = json.loads((path / "plan.json").read_text())
    keep = {"plan.json", sparsec.plan.LOCK_FILE, doc["tensors"]["file"]}
    return sorted(p.name for p in path.iterdir() if p.name not in keep)


def _tensors_file(path: Path) -> Path:
    doc = json.loads((path / "plan.json").read_text())
    return path / (doc["tensors"]["file"] if isinstance(doc.get("tensors"), dict) else "tensors.safetensors")


def _rewrite_tensors(path: Path, mutate) -> Path:
    """Change a saved plan's tensors and record their new checksum: a crafted file, not a damaged one."""
    from safetensors.torch import load_file, save_file

    f = _tensors_file(path)
    tensors = load_file(str(f))
    mutate(tensors)
    save_file(tensors, str(f))
    doc = json.loads((path / "plan.json").read_text())
    if isinstance(doc.get("tensors"), dict):
        data = f.read_bytes()
        doc["tensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (path / "plan.json").write_text(json.dumps(doc))
    return f


def _edit_plan_json(path: Path, edit) -> Path:
    doc = json.loads((path / "plan.json").read_text())
    edit(doc)
    (path / "plan.json").write_text(json.dumps(doc))
    return path / "plan.json"


def _same_plan(a: sparsec.Plan, b: sparsec.Plan) -> None:
    assert a.sites == b.sites and a.recipe == b.recipe and a.meta == b.meta
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


@pytest.fixture(scope="module")
def nm_plan(tiny, tiny_batches):
    """2:8 magnitude pruning (4-bit positions: room for out-of-range values)."""
    return sparsec.calibrate(tiny, tiny_batches, {"passes": {"nm_weights": {"n": 2, "m": 8}}}, progress=False)


def _nm_site(plan) -> str:
    return sorted(plan.sites)[0]


def _teal_site(plan) -> str:
    return next(k for k, e in sorted(plan.sites.items()) if e["sparsity"] > 0)


# ---- item 7: atomic, locked saves ---------------------------------------------------------------


def test_save_killed_at_random_moments_leaves_old_or_new_plan(tmp_path):
    """A child process saves two plans alternately and is SIGKILLed at a random moment, six
    times: each time the folder loads as one of the two plans, whole. A later save leaves no
    stray files of the killed saves."""
    path = tmp_path / "p.sparsec"
    _marked_plan("1").save(path)
    rng = random.Random(15)
    for _ in range(6):
        proc = _child(path, "1,2", 2_000_000, -1)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        _assert_whole(sparsec.Plan.load(path))
    _marked_plan("3").save(path)
    assert _assert_whole(sparsec.Plan.load(path)) == "3"
    assert _stray_files(path) == []


def test_concurrent_saves_from_two_processes_never_mix(tmp_path):
    """Two processes save their own plan into one folder 12 times each while this one loads it
    over and over: every load is one whole plan, and the folder ends with one tensors file."""
    path = tmp_path / "p.sparsec"
    _marked_plan("1").save(path)
    procs = [_child(path, w, 1_000_000, 12) for w in ("1", "2")]
    loads = 0
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            _assert_whole(sparsec.Plan.load(path))
            loads += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    assert loads > 0
    _assert_whole(sparsec.Plan.load(path))
    assert _stray_files(path) == []


def _two_nm_plans(nm_plan):
    old = sparsec.Plan(recipe=nm_plan.recipe, sites=nm_plan.sites, tensors=nm_plan.tensors, meta={"which": "old"})
    new_tensors = {k: (v * 2 if v.is_floating_point() else v) for k, v in nm_plan.tensors.items()}
    new = sparsec.Plan(recipe=nm_plan.recipe, sites=nm_plan.sites, tensors=new_tensors, meta={"which": "new"})
    return old, new


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_full_disk_while_writing_tensors_keeps_the_old_plan(tmp_path, monkeypatch, nm_plan, error):
    """The tensors write fails half-way (a full disk): PlanError naming the folder and the
    reason, and the old plan still loads, unchanged, with no stray files."""
    import safetensors
    import safetensors.torch

    old, new = _two_nm_plans(nm_plan)
    path = old.save(tmp_path / "p.sparsec")
    before = sorted(p.name for p in path.iterdir())

    def full_disk(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors)
        Path(filename).write_bytes(data[: len(data) // 2])
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(PlanError, match=rf"cannot save the plan to {re.escape(repr(str(path)))}.*No space left on device"):
        new.save(path)
    monkeypatch.undo()
    _same_plan(sparsec.Plan.load(path), old)
    assert sorted(p.name for p in path.iterdir()) == before


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_full_disk_at_each_sync_keeps_the_old_plan(tmp_path, monkeypatch, nm_plan, fail_at):
    """A full disk often shows only when the data is synced: failing the first, second or third
    fsync of a save (the tensors file, the folder after its rename, plan.json) raises PlanError
    and keeps the old plan."""
    old, new = _two_nm_plans(nm_plan)
    path = old.save(tmp_path / "p.sparsec")
    before = sorted(p.name for p in path.iterdir())
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PlanError, match="No space left on device"):
        new.save(path)
    monkeypatch.undo()
    _same_plan(sparsec.Plan.load(path), old)
    assert sorted(p.name for p in path.iterdir()) == before


def test_non_json_meta_fails_before_touching_the_disk(tmp_path, tiny_plan):
    fresh = tmp_path / "fresh.sparsec"
    bad = sparsec.Plan(recipe=tiny_plan.recipe, sites=tiny_plan.sites, meta={"model": object(), "ok": 1})
    with pytest.raises(PlanError, match=r"meta\['model'\] is not JSON \(object\)"):
        bad.save(fresh)
    assert not fresh.exists()
    existing = tiny_plan.save(tmp_path / "old.sparsec")
    files = {p.name: p.read_bytes() for p in existing.iterdir()}
    bad.meta = {"nested": {"deep": [1, torch.zeros(1)]}}
    with pytest.raises(PlanError, match=r"meta\['nested'\]\['deep'\]\[1\] is not JSON \(Tensor\)"):
        bad.save(existing)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == files
    with pytest.raises(PlanError, match="tensor 'x' is a str, not a torch.Tensor"):
        sparsec.Plan(recipe=tiny_plan.recipe, tensors={"x": "no"}).save(fresh)
    assert not fresh.exists()


def test_save_waits_for_the_lock_and_says_what_it_waits_for(tmp_path, monkeypatch, tiny_plan):
    from filelock import FileLock

    path = tiny_plan.save(tmp_path / "p.sparsec")
    monkeypatch.setattr(sparsec.plan, "SAVE_LOCK_TIMEOUT_S", 0.3)
    other = sparsec.Plan(recipe=tiny_plan.recipe, sites={}, meta={"which": "other"})
    with FileLock(str(path / sparsec.plan.LOCK_FILE)):  # another save in progress
        with pytest.raises(PlanError, match=r"waited 0.3 s for the lock .*\.plan\.lock.*another process is saving a plan"):
            other.save(path)
    assert sparsec.Plan.load(path).sites == tiny_plan.sites
    other.save(path)  # the lock was released: the save goes through
    assert sparsec.Plan.load(path).sites == {}


def test_saved_plan_records_the_checksum_of_its_tensors_file(tmp_path, nm_plan):
    path = nm_plan.save(tmp_path / "p.sparsec")
    doc = json.loads((path / "plan.json").read_text())
    assert doc["format_version"] == sparsec.plan.FORMAT_VERSION == 2
    f = path / doc["tensors"]["file"]
    data = f.read_bytes()
    assert doc["tensors"]["sha256"] == hashlib.sha256(data).hexdigest() and doc["tensors"]["bytes"] == len(data)
    assert f.name == f"tensors-{doc['tensors']['sha256'][:16]}.safetensors"
    _same_plan(sparsec.Plan.load(path), nm_plan)


# ---- item 4: entries and tensors checked at load ----------------------------------------------------


def test_flipped_byte_in_the_tensors_file_is_refused(tmp_path, nm_plan):
    path = nm_plan.save(tmp_path / "p.sparsec")
    f = _tensors_file(path)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one bit of one compressed weight
    f.write_bytes(bytes(data))
    with pytest.raises(PlanError, match=rf"{re.escape(repr(str(f)))} is damaged: its sha256 is [0-9a-f]+, plan.json records"):
        sparsec.Plan.load(path)
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(PlanError, match=rf"{re.escape(repr(str(f)))} is damaged: .*bytes"):
        sparsec.Plan.load(path)
    f.unlink()
    with pytest.raises(PlanError, match=rf"{re.escape(repr(str(f)))}.* is missing"):
        sparsec.Plan.load(path)


def _set_position_byte(value: int):
    def mutate(tensors):
        key = next(k for k in sorted(tensors) if k.endswith(".positions"))
        tensors[key][0, 0] = value

    return mutate


@pytest.mark.parametrize("byte,problem", [
    (0x91, r"holds position 9 in group 0 of row 0; 2:8 positions must be below 8"),  # fields 1, 9
    (0x33, r"holds position 3 twice in group 0 of row 0"),  # fields 3, 3: one weight counted twice
])
def test_bad_nm_positions_are_refused(tmp_path, nm_plan, byte, problem):
    """Positions the C++ kernel would follow outside their group (memory unsafety) or count
    twice: a PlanError naming the tensors file, the site and the tensor."""
    path = nm_plan.save(tmp_path / "p.sparsec")
    f = _rewrite_tensors(path, _set_position_byte(byte))
    site = _nm_site(nm_plan)
    with pytest.raises(PlanError, match=rf"^{re.escape(repr(str(f)))}: site {re.escape(repr(site))}: tensor "
                                        rf"{re.escape(repr(site + '.positions'))} {problem}$"):
        sparsec.Plan.load(path)


@pytest.mark.parametrize("mutate,problem", [
    (lambda t, k: t.__setitem__(f"{k}.values", t[f"{k}.values"].to(torch.int32)),
     r"tensor '{k}.values' has dtype torch.int32; it must be a floating-point dtype"),
    # cutting values was reported by the C++ kernel as a *positions* error at the first call
    (lambda t, k: t.__setitem__(f"{k}.values", t[f"{k}.values"][:, :-2].contiguous()),
     r"tensor '{k}.values' has shape \[\d+, \d+\]; it must be \[\d+, \d+\] \(2:8 of a \[\d+, \d+\] weight\)"),
    (lambda t, k: t.__setitem__(f"{k}.positions", t[f"{k}.positions"].to(torch.int64)),
     r"tensor '{k}.positions' has dtype torch.int64; it must be torch.uint8"),
    (lambda t, k: t.__setitem__(f"{k}.positions", t[f"{k}.positions"][:-1].contiguous()),
     r"tensor '{k}.positions' has shape \[\d+, \d+\]; it must be \[\d+, \d+\] \(\d+ 4-bit positions per row, "
     r"rows padded to 4 bytes\)"),
    (lambda t, k: t.pop(f"{k}.values"), r"tensor '{k}.values' is missing"),
], ids=["values-dtype", "values-cut", "positions-dtype", "positions-rows", "values-missing"])
def test_wrong_nm_tensors_are_refused(tmp_path, nm_plan, mutate, problem):
    path = nm_plan.save(tmp_path / "p.sparsec")
    site = _nm_site(nm_plan)
    f = _rewrite_tensors(path, lambda t: mutate(t, site))
    with pytest.raises(PlanError, match=rf"^{re.escape(repr(str(f)))}: site {re.escape(repr(site))}: "
                                        + problem.format(k=re.escape(site)) + "$"):
        sparsec.Plan.load(path)


@pytest.mark.parametrize("edit,problem", [
    (lambda e: e.update(threshold=float("nan")), r"'threshold' is nan; it must be a finite number >= 0"),
    (lambda e: e.update(threshold=float("inf")), r"'threshold' is inf; it must be a finite number >= 0"),
    (lambda e: e.update(threshold=-0.5), r"'threshold' is -0.5; it must be a finite number >= 0"),
    (lambda e: e.update(threshold="0.3"), r"'threshold' is '0.3' \(a str\); it must be a finite number >= 0"),
    (lambda e: e.pop("threshold"), r"'threshold' is missing"),  # was KeyError: 'threshold' at the first compile
    (lambda e: e.update(sparsity=1.5), r"'sparsity' is 1.5; it must be a finite number in \[0, 1\)"),
    (lambda e: e.update(kind="fancy"), r"'kind' is 'fancy'; it must be one of 'teal', 'cats'"),
    (lambda e: e.update(weight_shapes={"weight": [64, "x"]}), r"'weight_shapes' must map roles to lists of sizes, got .*"),
], ids=["nan", "inf", "negative", "string", "missing", "sparsity", "kind", "shapes"])
def test_bad_threshold_entries_are_refused(tmp_path, tiny_plan, edit, problem):
    path = tiny_plan.save(tmp_path / "p.sparsec")
    site = _teal_site(tiny_plan)
    j = _edit_plan_json(path, lambda doc: edit(doc["sites"][site]))
    with pytest.raises(PlanError, match=rf"^{re.escape(repr(str(j)))}: site {re.escape(repr(site))}: {problem}$"):
        sparsec.Plan.load(path)


def test_entries_name_a_registered_pass(tmp_path, tiny_plan):
    path = tiny_plan.save(tmp_path / "p.sparsec")
    site = _teal_site(tiny_plan)
    j = _edit_plan_json(path, lambda doc: doc["sites"][site].update({"pass": "fancy_pass"}))
    with pytest.raises(PlanError, match=rf"{re.escape(repr(str(j)))}: site {re.escape(repr(site))} was made by pass "
                                        r"'fancy_pass', which is not registered"):
        sparsec.Plan.load(path)
    _edit_plan_json(path, lambda doc: doc["sites"][site].pop("pass"))
    with pytest.raises(PlanError, match=rf"site {re.escape(repr(site))}: 'pass' is missing"):
        sparsec.Plan.load(path)
    _edit_plan_json(path, lambda doc: doc["sites"].__setitem__(site, [1, 2]))
    with pytest.raises(PlanError, match=rf"site {re.escape(repr(site))}: the entry is a list, not an object"):
        sparsec.Plan.load(path)


def test_site_keys_are_namespaced_by_the_pass_that_owns_them(tiny, tiny_plan):
    """Calibration stores entries through ``Plan.add_entries``: a key another pass holds, or an
    entry made in another pass's name, is refused naming both; a compile refuses an entry that
    a different pass made for the matched site (it would read another pass's fields)."""
    site = _teal_site(tiny_plan)
    plan = sparsec.Plan(recipe=tiny_plan.recipe, sites={k: dict(e) for k, e in tiny_plan.sites.items()})
    with pytest.raises(PlanError, match=rf"site {re.escape(repr(site))} is claimed by two passes, "
                                        r"'activation_threshold' and 'nm_weights'"):
        plan.add_entries("nm_weights", {site: {"sparsity": 0.5}})
    with pytest.raises(PlanError, match=r"pass 'nm_weights' made the entry for site 'x' in the name of pass 'other'"):
        plan.add_entries("nm_weights", {"x": {"pass": "other"}})
    plan.add_entries("activation_threshold", {site: {**plan.sites[site], "threshold": 0.0}})  # its own: replaced
    assert plan.sites[site]["threshold"] == 0.0 and plan.sites[site]["pass"] == "activation_threshold"
    plan.sites[site]["pass"] = "nm_weights"
    with pytest.raises(PlanError, match=rf"site {re.escape(repr(site))}: the plan's entry was made by pass "
                                        r"'nm_weights', but pass 'activation_threshold' matched"):
        sparsec.export(tiny, (torch.randint(0, 256, (1, 9)),), plan=plan)


def test_bad_in_memory_plans_are_refused_at_rewrite(tiny, tiny_plan, nm_plan):
    """Plans never saved are checked when a pass asks for their entry: a PlanError naming the
    site and key, not a NaN threshold that zeroes the input or a C++ error at the first call."""
    ids = torch.randint(0, 256, (1, 20))
    site = _teal_site(tiny_plan)
    sites = {k: dict(e) for k, e in tiny_plan.sites.items()}
    sites[site]["threshold"] = float("nan")
    bad = sparsec.Plan(recipe=tiny_plan.recipe, sites=sites)
    with pytest.raises(PlanError, match=rf"^site {re.escape(repr(site))}: 'threshold' is nan"):
        sparsec.export(tiny, (ids,), plan=bad)
    nm_site = _nm_site(nm_plan)
    tensors = dict(nm_plan.tensors)
    tensors[f"{nm_site}.values"] = tensors[f"{nm_site}.values"][:, :-2]
    bad = sparsec.Plan(recipe=nm_plan.recipe, sites=nm_plan.sites, tensors=tensors)
    with pytest.raises(PlanError, match=rf"^site {re.escape(repr(nm_site))}: tensor '{re.escape(nm_site)}.values' has shape"):
        sparsec.export(tiny, (ids,), plan=bad)


def test_version_1_plan_folder_still_loads_and_is_replaced_by_a_save(tmp_path, nm_plan, tiny):
    """A folder as sparsec wrote it before checksums (format version 1: plan.json and
    tensors.safetensors) loads, with its entries checked; saving over it leaves the new layout
    only."""
    from safetensors.torch import save_file

    path = tmp_path / "v1.sparsec"
    path.mkdir()
    doc = {"format": "sparsec-plan", "format_version": 1, "meta": nm_plan.meta, "recipe": nm_plan.recipe,
           "sites": nm_plan.sites}
    (path / "plan.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    save_file({k: v.contiguous() for k, v in nm_plan.tensors.items()}, str(path / "tensors.safetensors"))
    loaded = sparsec.Plan.load(path)
    _same_plan(loaded, nm_plan)
    assert loaded.format_version == 1
    ids = torch.randint(0, 256, (1, 7))
    ep = sparsec.export(tiny, (ids,), plan=loaded)
    assert sum("sparsec.nm_linear" in str(n.target) for n in ep.graph.nodes) > 0

    site = _nm_site(nm_plan)
    _edit_plan_json(path, lambda d: d["sites"][site].update(n=9))  # v1 entries are checked too
    with pytest.raises(PlanError, match=rf"site {re.escape(repr(site))}: 'n' is 9; .*n < m"):
        sparsec.Plan.load(path)

    nm_plan.save(path)  # over the version-1 folder
    assert "tensors.safetensors" not in {p.name for p in path.iterdir()}
    assert _stray_files(path) == []
    again = sparsec.Plan.load(path)
    assert again.format_version == 2
    _same_plan(again, nm_plan)


def test_loaded_plan_with_threshold_zero_sites_still_compiles(tmp_path, tiny, tiny_batches):
    """A greedy allocation may leave a group dense (sparsity 0, threshold 0): a valid entry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sparsec.calibrate(tiny, tiny_batches, {"passes": {"activation_threshold": {
            "mode": "teal", "sparsity": 0.4, "allocation": "uniform"}}}, progress=False)
    site = _teal_site(plan)
    plan.sites[site] = {**plan.sites[site], "sparsity": 0.0, "threshold": 0.0, "measured_sparsity": 0.0}
    path = plan.save(tmp_path / "p.sparsec")
    ids = torch.randint(0, 256, (1, 6))
    sparsec.export(tiny, (ids,), plan=sparsec.Plan.load(path))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8), (2, 3), (3, 7), (2, 16), (1, 256), (3, 256)])
def test_position_check_agrees_with_a_plain_decode(n, m):
    """Single-byte edits of packed positions: check_entry refuses exactly the edits that put a
    position out of range or twice in a group (a byte-table fast path covers 1:m, 2:4, 2:8,
    2:16; m = 256 once compared uint8 positions with 256, which wrapped to 0)."""
    from sparsec.kernels.nm import bits_for, nm_mask, pack
    from sparsec.passes.nm_weights import NMWeights

    g = torch.Generator().manual_seed(n * 1000 + m)
    in_f = m * 8
    w = torch.randn(6, in_f, generator=g)
    values, positions = pack(w, nm_mask(w.abs(), n, m), n, m)
    entry = {"pass": "nm_weights", "kind": "nm", "n": n, "m": m, "sparsity": 1 - n / m,
             "weights": {"weight": "w"}, "weight_shapes": {"weight": [6, in_f]}}
    NMWeights().check_entry("k", entry, {"k.values": values, "k.positions": positions})
    kept, bits = in_f // m * n, bits_for(m)
    used = -(-kept * bits // 8)
    for _ in range(60):
        p = positions.clone()
        r, c, b = (int(torch.randint(hi, (1,), generator=g)) for hi in (6, used, 256))
        p[r, c] = b
        f = ((p.int().unsqueeze(-1) >> torch.arange(0, 8, bits)) & ((1 << bits) - 1)).reshape(6, -1)[:, :kept]
        s = f.reshape(6, -1, n).sort(-1).values
        bad = bool((f >= m).any()) or bool((s[..., 1:] == s[..., :-1]).any())
        try:
            NMWeights().check_entry("k", entry, {"k.values": values, "k.positions": p})
        except PlanError:
            assert bad, (r, c, b)
        else:
            assert not bad, (r, c, b)
