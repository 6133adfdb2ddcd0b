"""`dpft report`: golden tables from fixture run directories, determinism, missing cells, W&B pull.

The fixture store is generated here (`build_store`) from closed-form curves, so every expected
number in the golden files can be re-derived by hand; regenerate the golden files after an
intended format change with  DPFT_UPDATE_GOLDEN=1 pytest tests/test_report.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpft import report as rp
from dpft.report.formats import to_markdown
from dpft import store
from dpft.cli import app
from dpft.errors import DpftError
from dpft.sweeps.plan import Job, Plan, read_plan, write_plan
from dpft.sweeps.spec import load_sweep

FIXTURES = Path(__file__).parent / "fixtures" / "report"
SWEEP_FILE = FIXTURES / "fixture.yaml"
GOLDEN = FIXTURES / "golden"
EVAL_STEPS = (25, 50, 75, 100, 150, 200)
# (ε, method, seed) → what the store holds for that planned run
MISSING = {(8, "denoise", 2)}                       # never ran: no directory
FAILED = {(3, "dpsgd", 1)}                          # crashed: meta says failed
NOT_RUN_CELL = {(8, "dpsgd", s) for s in range(3)}  # a whole cell without runs


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)


def accuracy(method: str, eps: int, seed: int, step: int) -> float:
    """A saturating curve: denoise rises faster early, DP-SGD ends higher at ε=3."""
    ceiling = {"dpsgd": 0.90, "denoise": 0.88}[method] + (0.02 if eps == 8 else 0.0)
    tau = {"dpsgd": 60.0, "denoise": 40.0}[method]
    return round(0.5 + (ceiling - 0.5) * (1 - math.exp(-step / tau)) + 0.004 * seed, 4)


def improvement(method: str, seed: int, step: int) -> float:
    return 0.0 if method == "dpsgd" else round(0.02 + 0.001 * seed - 0.00005 * step, 6)


def make_job(eps: int, method: str, seed: int) -> Job:
    config = {"method": {"name": method, "private": True}, "seed": seed,
              "task": {"name": "sst2", "metric": "accuracy", "target": 0.9}, "privacy": {"epsilon": eps, "noise": "secure"},
              "train": {"steps": 200}}
    return Job(run_id=f"fx{eps}{method[:2]}{seed}", slug=f"{method}-sst2-eps{eps}-s{seed}",
               overrides=[f"privacy.epsilon={eps}", f"method={method}", f"seed={seed}"],
               axes={"privacy.epsilon": str(eps), "method": method, "seed": str(seed)},
               choices={"method": method, "task": "sst2"}, config=config, wandb={"project": "dpft", "entity": None})


def write_run(out: Path, job: Job, status: str = "done") -> None:
    eps, method, seed = job.config["privacy"]["epsilon"], job.config["method"]["name"], job.config["seed"]
    d = store.run_dir(out, job.run_id)
    d.mkdir(parents=True)
    store.atomic_write_text(d / "config.yaml", yaml.safe_dump(job.config, sort_keys=True))
    records = []
    for step in range(5, 201, 5):
        rec = {"step": step, "train/loss": round(0.7 - step / 1000, 4),
               "train/improvement": improvement(method, seed, step)}
        if step in EVAL_STEPS:
            rec["eval/accuracy"] = accuracy(method, eps, seed, step)
            rec["privacy/epsilon"] = eps * step / 200
        records.append(rec)
    if status != "done":
        records = records[:17]  # crashed part-way
    (d / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if status == "done":
        final = records[-1]["eval/accuracy"]
        store.atomic_write_json(d / "summary.json", {"run_id": job.run_id, "final": final, "metric": "accuracy"})
    store.atomic_write_json(d / "meta.json", {"run_id": job.run_id, "status": status})


def build_store(out: Path) -> Plan:
    """Plan of 2 ε × 2 methods × 3 seeds for the fixture sweep, and its run directories."""
    jobs = [make_job(eps, m, s) for eps in (3, 8) for m in ("dpsgd", "denoise") for s in range(3)]
    plan = Plan(name="fixture", jobs=jobs, output_dir=out, source=str(SWEEP_FILE), grid_points=len(jobs))
    write_plan(plan, load_sweep(str(SWEEP_FILE)))
    for job in jobs:
        key = (job.config["privacy"]["epsilon"], job.config["method"]["name"], job.config["seed"])
        if key in MISSING or key in NOT_RUN_CELL:
            continue
        write_run(out, job, "failed" if key in FAILED else "done")
    return plan


def _render(out: Path, dest: Path):
    plan = read_plan(out, "fixture")
    return rp.render(plan, load_sweep(str(SWEEP_FILE)).report, dest)


def test_golden_report_files(tmp_path):
    build_store(tmp_path / "outputs")
    rep = _render(tmp_path / "outputs", tmp_path / "r1")
    names = [f"fixture{s}" for s in (".md", ".tex", ".csv")]
    if os.environ.get("DPFT_UPDATE_GOLDEN"):
        for n in names:
            (GOLDEN / n).write_bytes((tmp_path / "r1" / n).read_bytes())
    for n in names:
        assert (tmp_path / "r1" / n).read_text() == (GOLDEN / n).read_text(), f"{n} differs from the golden file"
    assert {p.name for p in rep.files} >= {"fixture-metric.png", "fixture-metric.pdf",
                                           "fixture-improvement.png", "fixture-improvement.pdf"}


def test_same_inputs_give_byte_identical_files(tmp_path):
    build_store(tmp_path / "outputs")
    a = _render(tmp_path / "outputs", tmp_path / "a")
    _render(tmp_path / "outputs", tmp_path / "b")
    for f in a.files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    from PIL import Image

    with Image.open(tmp_path / "a" / "fixture-metric.png") as png:  # paper-ready, not screen-sized
        assert min(png.info["dpi"]) >= 199.5
    pdf = (tmp_path / "a" / "fixture-metric.pdf").read_bytes()
    assert b"CreationDate" not in pdf


def test_numbers_follow_from_the_runs(tmp_path):
    """Cells are re-derived from the closed-form curves: mean/std over the finished seeds only,
    counts flag missing and failed runs, steps-to-target uses task.target."""
    build_store(tmp_path / "outputs")
    rep = rp.build(read_plan(tmp_path / "outputs", "fixture"), load_sweep(str(SWEEP_FILE)).report)
    cells = rep.cells.set_index(["privacy.epsilon", "method", "measure"])
    # ε=3 DP-SGD: seed 1 failed → seeds 0 and 2
    vals = [accuracy("dpsgd", 3, s, 200) * 100 for s in (0, 2)]
    c = cells.loc[("3", "dpsgd", "final")]
    assert c["n"] == 2 and c["expected"] == 3
    assert c["mean"] == pytest.approx(sum(vals) / 2)
    assert c["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert c["paper"] == pytest.approx(90.1)
    # steps to 90% of 0.9 (0.81): first eval step with accuracy >= 0.81
    for method in ("dpsgd", "denoise"):
        seeds = (0, 2) if method == "dpsgd" else (0, 1, 2)
        first = [next(st for st in EVAL_STEPS if accuracy(method, 3, s, st) >= 0.81) for s in seeds]
        assert cells.loc[("3", method, "steps_to_90")]["mean"] == pytest.approx(sum(first) / len(first))
    # the cell with no finished run is present, empty and flagged
    empty = cells.loc[("8", "dpsgd", "final")]
    assert empty["n"] == 0 and empty["expected"] == 3 and math.isnan(empty["mean"])
    assert {j.run_id for j in rep.missing} == {"fx8de2", "fx3dp1", "fx8dp0", "fx8dp1", "fx8dp2"}
    md = to_markdown(rep)
    assert "(2/3)" in md and "—" in md and "target = the task's configured reference task.target (sst2 0.9)" in md


def test_target_best_uses_best_final_cell(tmp_path):
    build_store(tmp_path / "outputs")
    block = dict(load_sweep(str(SWEEP_FILE)).report, target="best", target_by=["task", "privacy.epsilon"], paper=[])
    rep = rp.build(read_plan(tmp_path / "outputs", "fixture"), block)
    # ε=3: best final cell mean is DP-SGD's (0.9 ceiling, seeds 0 and 2)
    best = sum(accuracy("dpsgd", 3, s, 200) for s in (0, 2)) / 2
    assert f"sst2 3 {best:.4g}" in rep.caption


def test_unlisted_swept_axis_becomes_a_row(tmp_path):
    build_store(tmp_path / "outputs")
    block = dict(load_sweep(str(SWEEP_FILE)).report, rows=["task"], paper=[])
    rep = rp.build(read_plan(tmp_path / "outputs", "fixture"), block)
    assert rep.spec.rows == ["task", "privacy.epsilon"] and "added as rows: privacy.epsilon" in rep.caption


def test_bad_report_blocks_are_one_line_errors(tmp_path):
    plan = build_store(tmp_path / "outputs")
    base = load_sweep(str(SWEEP_FILE)).report
    for bad, msg in [({"colums": ["method"]}, "unknown report key"), ({"measures": ["median"]}, "unknown measure"),
                     ({"rows": ["method.kapa"], "paper": []}, "neither a config value"),
                     ({"target": "sota"}, "report.target")]:
        with pytest.raises(DpftError, match=msg):
            rp.build(plan, {**base, **bad})


def test_cli_report_prints_table_and_writes_files(tmp_path):
    build_store(tmp_path / "outputs")
    res = CliRunner().invoke(app, ["report", str(SWEEP_FILE), f"paths.output_dir={tmp_path / 'outputs'}"])
    assert res.exit_code == 0, res.output
    assert "Fixture: DP-SGD vs denoise" in res.output and "5 of 12 planned runs not finished" in res.output
    out = tmp_path / "outputs" / "reports" / "fixture"
    assert (out / "fixture.md").read_text() == (GOLDEN / "fixture.md").read_text()


def test_report_without_finished_runs_says_so(tmp_path):
    out = tmp_path / "outputs"
    plan = build_store(out)
    for job in plan.jobs:  # keep the plan, drop every run
        d = store.run_dir(out, job.run_id)
        if d.exists():
            store.atomic_write_json(d / "meta.json", {"status": "failed"})
    res = CliRunner().invoke(app, ["report", str(SWEEP_FILE), f"paths.output_dir={out}"])
    assert res.exit_code != 0
    assert "none of the 12 planned runs has finished" in res.output
    assert not (out / "reports").exists()


def test_report_unknown_sweep_lists_available():
    res = CliRunner().invoke(app, ["report", "no-such-table"])
    assert res.exit_code == 2 and "available sweeps:" in res.output and "kappa" in res.output


class FakeRun:
    def __init__(self, job: Job, state: str = "finished"):
        self.job, self.state, self.id = job, state, "wb" + job.run_id
        self.config = {**job.config, "dpft/run_id": job.run_id}
        eps, method, seed = job.config["privacy"]["epsilon"], job.config["method"]["name"], job.config["seed"]
        self._rows = []
        for step in range(5, 201, 5):
            row = {"_step": step, "_runtime": 1.5, "train/improvement": improvement(method, seed, step)}
            if step in EVAL_STEPS:
                row["eval/accuracy"] = accuracy(method, eps, seed, step)
            self._rows.append(row)
        self.summary = {"summary/final": self._rows[-1]["eval/accuracy"], "summary/metric": "accuracy",
                        "privacy/epsilon": float(eps)}

    def scan_history(self):
        return iter(self._rows)


def test_from_wandb_fills_the_local_cache(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    plan = build_store(out)
    remote = {j.run_id: j for j in plan.jobs}
    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            wanted = set(filters["config.dpft/run_id"]["$in"])
            runs = [FakeRun(j) for rid, j in remote.items() if rid in wanted and rid != "fx8dp2"]
            return runs + [FakeRun(remote["fx8dp2"], state="running")]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    local_before = (store.run_dir(out, "fx3dp0") / "metrics.jsonl").read_bytes()
    res = CliRunner().invoke(app, ["report", str(SWEEP_FILE), f"paths.output_dir={out}", "--from-wandb", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert calls and calls[0][0] == "dpft"
    # fx8de2 and fx8dp0/1 were missing, fx3dp1 had failed locally; fx8dp2 is still running on W&B
    assert "W&B: 4 pulled, 7 already local, 1 not finished" in res.output
    assert (store.run_dir(out, "fx3dp0") / "metrics.jsonl").read_bytes() == local_before
    assert store.run_status(store.run_dir(out, "fx8dp0")) == "done"
    rep = rp.build(read_plan(out, "fixture"), load_sweep(str(SWEEP_FILE)).report)
    assert [j.run_id for j in rep.missing] == ["fx8dp2"]
    c = rep.cells.set_index(["privacy.epsilon", "method", "measure"]).loc[("8", "dpsgd", "@100")]
    assert c["n"] == 2 and c["mean"] == pytest.approx(sum(accuracy("dpsgd", 8, s, 100) * 100 for s in (0, 1)) / 2)


# --------------------------------------------------------------------------- typos and missing extras (issue 22)


@pytest.mark.parametrize("change,msg", [
    ({"metric": "eval/acuracy"}, r"report.metric: no finished run logged 'eval/acuracy'; did you mean eval/accuracy\? "
                                 r"logged keys: eval/accuracy"),
    ({"measures": ["final", "mean:nope/key"]}, r"mean:nope/key: no finished run logged 'nope/key'"),
    ({"measures": ["final", "@999"]}, r"@999: no finished run evaluated eval/accuracy at step 999; "
                                      r"eval steps: 25, 50, 75, 100, 150, 200"),
    ({"curves": {"metric": "eval/acc"}}, r"report.curves.metric: no finished run logged 'eval/acc'"),
])
def test_report_typos_are_one_line_errors(tmp_path, change, msg):
    """A misspelt metric key or an eval step no run has used to give a table of — and exit 0."""
    build_store(tmp_path / "outputs")
    block = {**load_sweep(str(SWEEP_FILE)).report, **change}
    with pytest.raises(DpftError, match=msg):
        rp.build(read_plan(tmp_path / "outputs", "fixture"), block)
    data = yaml.safe_load(SWEEP_FILE.read_text())
    data["report"] = block
    path = tmp_path / "typo" / "fixture.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    res = CliRunner().invoke(app, ["report", str(path), f"paths.output_dir={tmp_path / 'outputs'}"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")
    assert not (tmp_path / "outputs" / "reports").exists()


@pytest.mark.parametrize("module,args", [("matplotlib", []), ("pandas", ["--no-plots"]), ("tabulate", ["--no-plots"])])
def test_missing_report_extra_names_the_install_command(tmp_path, monkeypatch, module, args):
    """`pip install -e .` has no pandas/matplotlib: one line naming the extra, not a traceback."""
    build_store(tmp_path / "outputs")
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    res = CliRunner().invoke(app, ["report", str(SWEEP_FILE), f"paths.output_dir={tmp_path / 'outputs'}", *args])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f'error: dpft report needs {module}, not installed: pip install -e ".[report]" '
                                  '(in a checkout) or pip install "dpft[report]"')
    assert not (tmp_path / "outputs" / "reports").exists()


def test_reproductions_doc_names_only_report_files_that_exist():
    """docs/reproductions.md: every report file it names (figure links, `docs/reproductions/...` paths)
    is in the repository, so each verdict is traceable to the report that produced it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "reproductions.md").read_text()
    named = set(re.findall(r"\]\((reproductions/[^)\s]+)\)", text))
    named |= {m[len("docs/"):] for m in re.findall(r"docs/reproductions/[\w./-]+\.(?:md|csv|png|tex)", text)}
    assert named, "the document names no report file"
    missing = sorted(p for p in named if not (root / "docs" / p).is_file())
    assert not missing, missing
