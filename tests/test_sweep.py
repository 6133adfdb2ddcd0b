"""`dpft sweep`: grid expansion of every shipped sweep file, the plan, bad input, and real tiny
sweeps through the inline, local (with kill-and-resume) and submitit-local executors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpft import store
from dpft.cli import app
from dpft.config import compose_run, list_choices
from dpft.errors import DpftError
from dpft.sweeps.executors import LocalExecutor
from dpft.sweeps.job import run_job
from dpft.sweeps.plan import expand, job_state, make_plan, read_plan
from dpft.sweeps.spec import PACKAGE_SWEEPS, list_sweeps, load_sweep, parse_sweep_text

# Expected sizes of the shipped grids: changing one of these files should be a deliberate act.
SHIPPED = {"kappa": 6 * 2 * 3, "norm-correction": 2 * 2 * 3, "denoise-glue": 2 * (2 * 4 * 2 * 2 * 3), "smoke": 2 * 2,
           "psasc": 84, "anadp": 4 * 72, "grape": 2 * 2 * (1 + 3 * 2) * 3, "denoise-generation": 2 * 2 * 2 * 2 * 3,
           "denoise-ablation": (1 + 6 + 1 + 1 + 3) * 2 * 3}
ALL = sorted(p.stem for p in PACKAGE_SWEEPS.glob("*.yaml"))  # files other engineers add are checked too
# Tiny jobs: random-init tiny BERT on the synthetic task; non-private runs take ~1-3 s after imports.
TINY = "overrides: [debug=tiny, method=nonprivate, train.steps=3, train.eval_every=null]\n"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)


def sweep_file(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def _composable(sweep) -> bool:
    """Every config group option the file names exists (denoise may still be in development)."""
    points, _ = expand(sweep)
    for job in points:
        for o in job:
            key, _, value = o.partition("=")
            if key in ("method", "model", "task", "privacy", "optim") and value not in list_choices(key):
                return False
    return True


# --------------------------------------------------------------------------- shipped files


def test_every_shipped_sweep_is_listed_and_documented():
    found = list_sweeps()
    assert set(SHIPPED) <= set(found)
    for name in SHIPPED:
        text = found[name].read_text()
        assert text.startswith(f"# dpft sweep {name}"), f"{name}.yaml must open with the command that runs it"
        assert f"dpft report {name}" in text
    assert "---- sweep file format" in (PACKAGE_SWEEPS / "kappa.yaml").read_text()


@pytest.mark.parametrize("name", ALL)
def test_shipped_sweep_expands(name):
    sweep = load_sweep(name)
    points, axes = expand(sweep)
    assert len(points) == SHIPPED.get(name, len(points)) > 0
    assert len({tuple(p) for p in points}) == len(points)
    assert points == expand(sweep)[0], "expansion must be deterministic"
    for block in sweep.grid:
        for key, value in block.items():
            if any(t in value for t in (",", "range(", "choice(", "glob(")):
                assert key in axes, key
    if name in ("kappa", "norm-correction", "denoise-glue"):
        assert all("train.eval_at=[50,100,200,400]" in p for p in points)
    if name == "kappa":
        kappas = sorted({o for p in points for o in p if o.startswith("method.kappa=")})
        assert kappas == [f"method.kappa={k}" for k in ("1.0", "1.01", "1.02", "1.05", "1.1", "1.2")]
    if name == "norm-correction":
        # Hydra renders swept booleans as True/False; its grammar reads them back case-insensitively
        assert {o.lower() for p in points for o in p if o.startswith("method.norm_correction=")} == {
            "method.norm_correction=true", "method.norm_correction=false"}


@pytest.mark.parametrize("name", ALL)
def test_sweep_runs_the_recipe_its_header_states(name):
    """A sweep whose header cites a recipe's C, lr or batch composes every job with those values
    (privacy=li2022 sets C only; the lr once silently stayed at optim/adamw's 1e-3 while the
    headers said Li et al.'s 5e-4)."""
    import re

    text = (PACKAGE_SWEEPS / f"{name}.yaml").read_text()
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    stated = {}
    if m := re.search(r"AdamW (\d(?:\.\d+)?e-\d)", header):
        stated["optim.lr"] = float(m.group(1))
    if m := re.search(r"C = (\d(?:\.\d+)?)[,)]", header):
        stated["privacy.clip_norm"] = float(m.group(1))
    if m := re.search(r"batch (\d{3,})\b", header):
        stated["train.batch_size"] = float(m.group(1))
    if not stated:
        pytest.skip(f"{name}: its header states no recipe values")
    sweep = load_sweep(name)
    if not _composable(sweep):
        pytest.skip(f"{name}: a config group option it uses is not in dpft/conf yet")
    points, _ = expand(sweep)
    for i in sorted({0, len(points) // 2, len(points) - 1}):
        cfg = compose_run(points[i]).cfg
        for key, want in stated.items():
            section, knob = key.split(".")
            if key == "optim.lr" and (cfg.method.name == "nonprivate" or cfg.optim.name != "adamw"):
                continue  # the header's "AdamW <lr>" is about the AdamW rows (psasc also has SGD rows)
            assert float(cfg[section][knob]) == want, f"{name} job {i}: {key} = {cfg[section][knob]}, header says {want}"


@pytest.mark.parametrize("name", ALL)
def test_shipped_sweep_composes_with_stable_ids(name):
    """First, middle and last job compose, get the run id `dpft train` would give them, the id is
    stable, and the report block names keys those configs have; the full composition of every job
    is in the slow test below."""
    from dpft.report.labels import MISSING, label_of
    from dpft.report.spec import as_list, parse_report
    from dpft.config import semantic_config
    from dpft.sweeps.plan import Job, Plan

    sweep = load_sweep(name)
    if not _composable(sweep):
        pytest.skip(f"{name}: a config group option it uses is not in dpft/conf yet")
    points, _ = expand(sweep)
    picks = sorted({0, len(points) // 2, len(points) - 1})
    specs = [compose_run(points[i]) for i in picks]
    ids = [s.run_id for s in specs]
    assert ids == [compose_run(points[i]).run_id for i in picks]
    assert len(set(ids)) == len(ids)
    jobs = [Job(s.run_id, s.slug, s.overrides, {}, s.choices, semantic_config(s.cfg)) for s in specs]
    spec = parse_report(sweep.report, Plan(name, jobs, Path("unused")))
    keys = spec.rows + spec.cols + spec.over + as_list(spec.curves.get("hue"), "hue") + \
        as_list(spec.curves.get("panels"), "panels")
    for key in keys:  # every report key labels at least one job (a block may lack a method's knob)
        assert any(label_of(job, key) != MISSING for job in jobs), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_shipped_sweep_full_plan(name, tmp_path):
    sweep = load_sweep(name)
    if not _composable(sweep):
        pytest.skip(f"{name}: a config group option it uses is not in dpft/conf yet")
    plan = make_plan(sweep, [f"paths.output_dir={tmp_path}"])
    assert len(plan.jobs) == SHIPPED.get(name, plan.grid_points) and plan.duplicates == 0


# --------------------------------------------------------------------------- expansion rules


def test_cli_overrides_narrow_replace_and_add_axes(tmp_path):
    sweep = load_sweep("smoke")
    assert len(expand(sweep, ["seed=0"])[0]) == 2
    assert len(expand(sweep, ["method=dpsgd"])[0]) == 2
    assert len(expand(sweep, ["seed=range(5,8)"])[0]) == 6
    points, axes = expand(sweep, ["train.steps=2,3"])
    assert len(points) == 8 and axes == ["method", "seed", "train.steps"]
    # an overridden axis keeps its place in the product order
    first = expand(sweep, ["method=nonprivate,dpsgd"])[0][0]
    assert next(o for o in first if o.startswith("method=")) == "method=nonprivate"


def test_cli_narrows_blocks_by_their_own_keys(tmp_path):
    """In a multi-block grid a CLI value selects blocks: `task=sst2` keeps the SST-2 block and drops
    the QNLI block (before: both ran, the QNLI one re-labelled task=sst2 on QNLI data), and a knob
    only the method's block sweeps narrows that block without failing on the baseline rows."""
    sweep = parse_sweep_text(
        "overrides: [debug=tiny]\n"
        "grid:\n"
        "  - {task: sst2, task.max_length: '32', method: 'dpsgd,grape', seed: '0,1'}\n"
        "  - {task: qnli, task.max_length: '64', method: 'dpsgd,grape', seed: '0,1'}\n"
        "  - {task: sst2, method: grape, method.rank: '16,64', seed: '0,1'}\n", "b", tmp_path / "b.yaml")
    points, _ = expand(sweep, ["task=sst2"])
    assert len(points) == 4 + 4 and not any("task.max_length=64" in p for p in points)
    points, _ = expand(sweep, ["method.rank=16"])
    assert len(points) == 4 + 4 + 2
    assert sum("method.rank=16" in p for p in points) == 2 and not any("method.rank=64" in p for p in points)
    points, _ = expand(sweep, ["method=dpsgd"])   # the grape-only block is dropped
    assert len(points) == 2 + 2 and all("method=dpsgd" in p for p in points)
    # a value outside every block replaces, as with one block
    points, _ = expand(sweep, ["task=mnli"])
    assert len(points) == 12 and all("task=mnli" in p for p in points)


def test_grammar_choice_glob_and_delete(tmp_path):
    sweep = parse_sweep_text("overrides: [debug=tiny, ~diagnostics]\ngrid:\n  method: glob(*)\n  seed: choice(3,4)\n",
                             "g", tmp_path / "g.yaml")
    points, _ = expand(sweep)
    assert len(points) == 2 * len(list_choices("method"))
    assert all("~diagnostics" in p for p in points), "`~key` must survive expansion unchanged"


@pytest.mark.parametrize("text,msg", [
    ("grid: {seed: 'interval(0,1)'}", "only discrete sweeps"),
    ("grid: {seed: '[0,1'}", "malformed grid.seed"),
    ("grid: {seed: [0, 1]}", "Hydra's sweep grammar"),
    ("overrides: [debug=tiny]\ngird:\n  seed: 0,1", "unknown top-level key"),
    ("overrides: [debug=tiny, train.steps=-1]\ngrid:\n  seed: 0,1", r"job 1/2 \(seed=0\): train.steps must be >= 1"),
    ("grid: {seed: 0,1}", "flow: mapping"),
    ("overrides: [method=nosuch]", "unknown method 'nosuch'"),
    ("grid: {seed: 0,1", "invalid YAML"),
])
def test_malformed_sweeps_fail_before_any_job(tmp_path, text, msg):
    path = sweep_file(tmp_path, text, "bad")
    with pytest.raises(DpftError, match=msg):
        make_plan(load_sweep(str(path)), [f"paths.output_dir={tmp_path / 'out'}"])
    res = CliRunner().invoke(app, ["sweep", str(path), f"paths.output_dir={tmp_path / 'out'}", "-e", "inline"])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")
    assert not (tmp_path / "out" / "runs").exists()


def test_unknown_sweep_lists_the_available_ones():
    res = CliRunner().invoke(app, ["sweep", "no-such-table"])
    assert res.exit_code == 2
    assert "unknown sweep 'no-such-table'" in res.output and "kappa" in res.output and "denoise-glue" in res.output
    listing = CliRunner().invoke(app, ["sweep"])
    assert listing.exit_code == 0 and all(n in listing.output for n in SHIPPED)


def test_sweeps_are_found_on_the_search_path(tmp_path, monkeypatch):
    extra = tmp_path / "mysweeps"
    extra.mkdir()
    (extra / "mine.yaml").write_text("# dpft sweep mine\n" + TINY + "grid:\n  seed: 0,1\n")
    monkeypatch.setenv("DPFT_SWEEPS_PATH", str(extra))
    assert list_sweeps()["mine"] == extra / "mine.yaml"
    assert load_sweep("mine.yaml").path == extra / "mine.yaml"  # a bare file name falls back to the name
    res = CliRunner().invoke(app, ["sweep", "mine", f"paths.output_dir={tmp_path / 'out'}", "--dry-run"])
    assert res.exit_code == 0 and len(read_plan(tmp_path / "out", "mine").jobs) == 2


def test_dry_run_writes_the_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    path = sweep_file(tmp_path, TINY + "grid:\n  seed: range(0,3)\n  optim.lr: 1e-3,1e-3\n")
    res = CliRunner().invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = read_plan(out, "tiny")
    # 6 grid points, but lr=1e-3 twice is the same config: 3 distinct jobs
    assert len(plan.jobs) == 3 and plan.grid_points == 6
    for job in plan.jobs:
        assert compose_run(job.overrides).run_id == job.run_id
        assert job.config["seed"] == int(job.axes["seed"])
    assert (out / "sweeps" / "tiny" / "sweep.yaml").read_text() == path.read_text()
    assert not (out / "runs").exists()


def test_local_executor_pins_one_gpu_per_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = make_plan(load_sweep(str(sweep_file(tmp_path, TINY))), [f"paths.output_dir={tmp_path}"])
    ex = LocalExecutor(plan, force=False)
    assert ex.workers == 2
    assert [ex._env(s)["CUDA_VISIBLE_DEVICES"] for s in (0, 1)] == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = LocalExecutor(plan, force=False, workers=2)
    assert "CUDA_VISIBLE_DEVICES" not in {k for k, v in cpu._env(0).items() if v} and cpu.workers == 2


def test_job_refuses_a_stale_plan(tmp_path, capsys):
    assert run_job(["debug=tiny", f"paths.output_dir={tmp_path}"], run_id="000000000000")[0] == 2
    assert "configs changed since planning" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- real sweeps


def _states(out: Path, plan) -> dict[str, str]:
    return {j.run_id: job_state(out, j.run_id) for j in plan.jobs}


def test_inline_sweep_end_to_end_skip_retry_force(tmp_path):
    out = tmp_path / "out"
    # seed 1 uses a batch larger than the 400-example tiny dataset: that job fails, seed 0 must not care
    path = sweep_file(tmp_path, TINY + "grid:\n  train.batch_size: 32,1000\n")
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline"])
    assert res.exit_code == 1, res.output
    plan = read_plan(out, "tiny")
    ok, bad = plan.jobs
    assert job_state(out, ok.run_id) == "done" and "1 job(s) failed" in res.output
    assert "larger than the training set" in res.output  # the failed job says why
    # same run id as `dpft train` with the same overrides, and a real run directory
    assert compose_run(ok.overrides).run_id == ok.run_id
    summary = json.loads((store.run_dir(out, ok.run_id) / "summary.json").read_text())
    assert summary["run_id"] == ok.run_id and summary["steps"] == 3
    first = (store.run_dir(out, ok.run_id) / "meta.json").read_text()

    # re-run: the finished job is skipped (its files untouched); the bad one fails again
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline"])
    assert res.exit_code == 1 and "skipped" in res.output
    assert (store.run_dir(out, ok.run_id) / "meta.json").read_text() == first

    # a failure recorded in the store is not retried unless asked
    meta_path = store.run_dir(out, ok.run_id) / "meta.json"
    meta = json.loads(first)
    store.atomic_write_json(meta_path, {**meta, "status": "failed"})
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline", "train.batch_size=32"])
    assert res.exit_code == 1 and "failed earlier (use --retry-failed)" in res.output
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline", "train.batch_size=32",
                              "--retry-failed"])
    assert res.exit_code == 0, res.output
    assert job_state(out, ok.run_id) == "done"
    assert (store.run_dir(out, ok.run_id) / "attempts" / "1" / "meta.json").is_file()

    # --force re-runs finished jobs too
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline", "train.batch_size=32",
                              "--force"])
    assert res.exit_code == 0, res.output
    assert job_state(out, ok.run_id) == "done"
    assert (store.run_dir(out, ok.run_id) / "attempts" / "2" / "summary.json").is_file()


def test_fail_fast_stops_the_rest(tmp_path):
    out = tmp_path / "out"
    path = sweep_file(tmp_path, TINY + "grid:\n  train.batch_size: 1000,32\n")
    res = CliRunner().invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline", "--fail-fast"])
    assert res.exit_code == 1
    plan = read_plan(out, "tiny")
    assert job_state(out, plan.jobs[1].run_id) == "missing" and "cancelled" in res.output


def _wait_for(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_local_sweep_killed_and_resumed(tmp_path):
    """SIGKILL a real `dpft sweep --workers 2` once a job has finished: its workers die with it,
    a restart runs only what is missing and never touches a finished run."""
    out = tmp_path / "out"
    path = sweep_file(tmp_path, TINY + "grid:\n  seed: range(0,3)\n")
    cmd = [sys.executable, "-m", "dpft.cli", "sweep", str(path), f"paths.output_dir={out}", "--workers", "2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    log = open(tmp_path / "sweep1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: any(p.is_file() for p in (out / "runs").glob("*/summary.json")), 240, "a finished job")
    finally:
        proc.kill()
        proc.wait()
    plan = read_plan(out, "tiny")
    # the workers get SIGTERM when their parent dies and record `interrupted`
    _wait_for(lambda: "running" not in _states(out, plan).values(), 60, "orphaned workers to stop")
    before = _states(out, plan)
    done = [rid for rid, st in before.items() if st == "done"]
    assert done and set(before.values()) <= {"done", "interrupted", "missing", "stale"}
    assert len(done) < len(plan.jobs), "the kill came too late to leave work for the restart"
    stamps = {rid: (store.run_dir(out, rid) / "summary.json").stat().st_mtime_ns for rid in done}

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(_states(out, plan).values()) == {"done"}
    for rid in done:
        assert (store.run_dir(out, rid) / "summary.json").stat().st_mtime_ns == stamps[rid]
        assert not (store.run_dir(out, rid) / "attempts").exists()
    assert res.stdout.count("skipped") >= len(done)
    for rid, st in before.items():
        if st == "interrupted":  # the killed attempt is archived, never overwritten
            assert (store.run_dir(out, rid) / "attempts" / "1" / "meta.json").is_file()


def test_submitit_local_executor(tmp_path):
    out = tmp_path / "out"
    path = sweep_file(tmp_path, TINY + "grid: {seed: 7}\n")
    res = CliRunner().invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "submitit-local",
                                   "--submitit", "timeout_min=10"])
    assert res.exit_code == 0, res.output
    [job] = read_plan(out, "tiny").jobs
    assert job_state(out, job.run_id) == "done"
    assert list((out / "sweeps" / "tiny" / "submitit").glob("*/*_result.pkl"))


def test_grid_blocks_put_a_baseline_beside_a_methods_own_axes(tmp_path):
    """`grid` as a list of blocks: DP-SGD rows (no s key) and PSASC rows swept over s, one plan,
    one report; the baseline's cells for the method's knob read —."""
    out = tmp_path / "out"
    text = ("overrides: [debug=tiny, train.steps=2, train.eval_every=null]\n"
            "grid:\n"
            "  - method: dpsgd\n"
            "  - method: psasc\n"
            "    method.s: 0.5,1.0\n"
            "report:\n  rows: [method, method.s]\n  measures: [final]\n")
    path = sweep_file(tmp_path, text)
    points, axes = expand(load_sweep(str(path)))
    assert len(points) == 3 and "method.s" in axes
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(path), f"paths.output_dir={out}", "-e", "inline"])
    assert res.exit_code == 0, res.output
    assert [job_state(out, j.run_id) for j in read_plan(out, "tiny").jobs] == ["done"] * 3
    res = runner.invoke(app, ["report", str(path), f"paths.output_dir={out}"])
    assert res.exit_code == 0, res.output
    md = next(out.glob("reports/tiny/*.md")).read_text()
    rows = [line for line in md.splitlines() if line.startswith("|") and ("dpsgd" in line or "psasc" in line)]
    assert len(rows) == 3
    assert any("dpsgd" in r and "—" in r for r in rows)
    assert sum("psasc" in r for r in rows) == 2


@pytest.mark.parametrize("grid", ["[{seed: 1}, 3]", "[[1, 2]]", "[{seed: 1}, {seed: }]"])
def test_bad_grid_blocks_are_one_line_errors(tmp_path, grid):
    path = sweep_file(tmp_path, TINY + f"grid: {grid}\n")
    res = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
