"""`report.compare`: paired claims with a sign test, a bootstrap interval and a verdict.

The statistics are checked against values computed by hand (exact binomial tail sums); the whole
path runs through the real `dpft report` CLI on a fake run store whose curves are step functions,
so every count, p-value and mean difference below follows from the tables in this file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpft import report as rp
from dpft.report import stats
from dpft import store
from dpft.cli import app
from dpft.errors import DpftError
from dpft.sweeps.plan import Job, Plan, read_plan, write_plan
from dpft.sweeps.spec import load_sweep


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------- statistics, known answers


@pytest.mark.parametrize("better,worse,p", [
    (10, 0, 2 / 2 ** 10),             # all one way: 2 · (1/2)^10
    (0, 6, 2 / 2 ** 6),
    (8, 2, 2 * (1 + 10 + 45) / 1024),  # 2 · P(X ≥ 8), X ~ Bin(10, 1/2)
    (8, 1, 2 * (1 + 9) / 512),         # 2 · P(X ≥ 8), X ~ Bin(9, 1/2)
    (4, 1, 2 * (1 + 5) / 32),
    (3, 3, 1.0),
    (0, 0, 1.0),                       # every pair tied: no evidence either way
])
def test_sign_test_p_values_by_hand(better, worse, p):
    assert stats.sign_test_p(better, worse) == pytest.approx(p, rel=1e-12)


def test_verdicts_and_their_reasons():
    assert stats.verdict(6, 0, 0.05)[0] == "supported"          # p = 1/32
    assert stats.verdict(0, 6, 0.05)[0] == "contradicted"
    v, p, why = stats.verdict(5, 0, 0.05)                       # p = 1/16 > 0.05 although all 5 agree
    assert v == "inconclusive" and p == pytest.approx(0.0625) and "smallest possible p 0.0625" in why
    v, p, why = stats.verdict(8, 2, 0.05)                       # n = 10 could reach α; this split does not
    assert v == "inconclusive" and "smallest possible" not in why
    assert stats.verdict(8, 2, 0.2)[0] == "supported"           # the claim's α is honoured
    assert "every pair is tied" in stats.verdict(0, 0, 0.05)[2]


def test_bootstrap_interval_contains_and_excludes_known_values():
    # mean 5.5; the bootstrap standard error of the mean is sd_pop/√n = √8.25/√10 ≈ 0.91, so the 95%
    # interval is about 5.5 ± 1.8: it must contain 5.5 and exclude 3 and 8 (≥ 2.7 standard errors away)
    lo, hi = stats.bootstrap_ci(list(range(1, 11)), 0.95)
    assert 3 < lo < 5.5 < hi < 8
    assert (lo, hi) == stats.bootstrap_ci(list(range(1, 11)), 0.95), "seeded: the same data give the same interval"
    lo90, hi90 = stats.bootstrap_ci(list(range(1, 11)), 0.90)
    assert lo < lo90 < hi90 < hi
    lo, hi = stats.bootstrap_ci([-1.0, 1.0, -2.0, 2.0, 0.5, -0.5], 0.95)   # mean 0: 0 inside
    assert lo < 0 < hi
    assert stats.bootstrap_ci([3.0, 3.0, 3.0], 0.95) == (3.0, 3.0)        # nothing can vary
    assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0], 0.95))   # one pair: no interval


# --------------------------------------------------------------------------- a fake run store

EVAL = (10, 20, 30, 40, 50)   # train.steps = 50; a never-reached run counts as 51 in the mean difference
NEVER = None
# first eval step at which accuracy reaches 0.85 (≥ 90% of task.target 0.9), per (ε, method) and seed 0..4
REACH = {
    (3, "dpsgd"): [40, 40, 30, NEVER, 20],
    (3, "denoise"): [20, 20, 20, 30, 20],     # vs dpsgd: better ×4 (one vs a never-reached run), tie ×1
    (8, "dpsgd"): [30, 30, 30, 30, 30],
    (8, "denoise"): [20, 20, 20, 20, 40],     # better ×4, worse ×1
}
SWEEP = """\
# dpft sweep claims   (test fixture: the plan and runs are written by tests/test_claims.py)
grid:
  privacy.epsilon: 3,8
  method: dpsgd,denoise
  seed: range(0,5)
report:
  title: "Claims fixture"
  metric: eval/accuracy
  rows: [task, privacy.epsilon]
  cols: [method]
  measures: [steps_to_90, final]
  target: task
  scale: 100
  labels: {privacy.epsilon: ε}
  compare:
    - claim: "denoise reaches 90% of the target in fewer steps than DP-SGD [N]"
      baseline: {method: dpsgd}
      measure: steps_to_90
      pool: [privacy.epsilon]
    - claim: "per ε [N]"
      baseline: {method: dpsgd}
      measure: steps_to_90
    - claim: "DP-SGD reaches the target sooner than denoise [N]"
      treatment: {method: dpsgd}
      baseline: {method: denoise}
      measure: steps_to_90
      pool: [privacy.epsilon]
    - claim: "denoise ends higher [N]"
      baseline: {method: dpsgd}
      measure: final
      pool: [privacy.epsilon]
"""


def accuracy(eps: int, method: str, seed: int, step: int) -> float:
    reach = REACH[(eps, method)][seed]
    return 0.85 if reach is not None and step >= reach else 0.6


def make_job(eps: int, method: str, seed: int) -> Job:
    config = {"method": {"name": method, "private": True}, "seed": seed,
              "task": {"name": "sst2", "metric": "accuracy", "target": 0.9}, "privacy": {"epsilon": eps},
              "train": {"steps": 50}}
    return Job(run_id=f"c{eps}{method[:2]}{seed}", slug=f"{method}-eps{eps}-s{seed}",
               overrides=[f"privacy.epsilon={eps}", f"method={method}", f"seed={seed}"],
               axes={"privacy.epsilon": str(eps), "method": method, "seed": str(seed)},
               choices={"method": method, "task": "sst2"}, config=config, wandb={})


def build_store(tmp_path: Path, text: str = SWEEP) -> tuple[Path, Path]:
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    out = tmp_path / "outputs"
    jobs = [make_job(e, m, s) for e in (3, 8) for m in ("dpsgd", "denoise") for s in range(5)]
    write_plan(Plan(name="claims", jobs=jobs, output_dir=out, source=str(path), grid_points=len(jobs)),
               load_sweep(str(path)))
    for job in jobs:
        eps, method, seed = job.config["privacy"]["epsilon"], job.config["method"]["name"], job.config["seed"]
        d = store.run_dir(out, job.run_id)
        d.mkdir(parents=True)
        store.atomic_write_text(d / "config.yaml", yaml.safe_dump(job.config))
        recs = [{"step": s, "train/loss": 0.5} for s in range(5, 51, 5)]
        for r in recs:
            if r["step"] in EVAL:
                r["eval/accuracy"] = accuracy(eps, method, seed, r["step"])
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        store.atomic_write_json(d / "summary.json", {"run_id": job.run_id, "final": recs[-1]["eval/accuracy"]})
        store.atomic_write_json(d / "meta.json", {"run_id": job.run_id, "status": "done"})
    return path, out


def _claims(out: Path) -> dict[tuple[str, str], dict]:
    rows = csv.DictReader(io.StringIO((out / "reports" / "claims" / "claims-claims.csv").read_text()))
    return {(r["claim_id"], r["group"]): r for r in rows}


def test_cli_report_tests_the_claims_end_to_end(tmp_path):
    path, out = build_store(tmp_path)
    res = CliRunner().invoke(app, ["report", str(path), f"paths.output_dir={out}", "--no-plots"])
    assert res.exit_code == 0, res.output
    got = _claims(out)
    # C1, pooled over seed and ε: better 4+4, equal 1, worse 1 → p = 2·P(X ≥ 8 | n = 9) = 20/512
    c1 = got[("C1", "task=sst2 · method=denoise")]
    assert (c1["pairs"], c1["n_better"], c1["n_equal"], c1["n_worse"]) == ("10", "8", "1", "1")
    assert float(c1["p_sign"]) == pytest.approx(20 / 512) and c1["verdict"] == "supported"
    assert (c1["censored_treatment"], c1["censored_baseline"]) == ("0", "1")
    # differences (never reached = 51): ε=3: -20 -20 -10 -21 0; ε=8: -10 -10 -10 -10 +10 → mean -10.1,
    # bootstrap standard error ≈ 2.9: the interval excludes 0 and the smallest difference
    assert float(c1["mean_diff"]) == pytest.approx(-10.1)
    assert -21 < float(c1["ci_low"]) < -10.1 < float(c1["ci_high"]) < 0
    # C2, per ε: 4/1/0 → p = 2/16; 4/0/1 → p = 2·6/32. n = 4 or 5 can never reach α = 0.05
    e3, e8 = got[("C2", "task=sst2 · ε=3 · method=denoise")], got[("C2", "task=sst2 · ε=8 · method=denoise")]
    assert (e3["n_better"], e3["n_equal"], e3["n_worse"], float(e3["p_sign"])) == ("4", "1", "0", 0.125)
    assert (e8["n_better"], e8["n_equal"], e8["n_worse"], float(e8["p_sign"])) == ("4", "0", "1", 0.375)
    assert e3["verdict"] == e8["verdict"] == "inconclusive"
    assert float(e3["mean_diff"]) == pytest.approx(-71 / 5)
    # C3 is C1 the other way round: contradicted with the same p
    c3 = got[("C3", "task=sst2 · method=dpsgd")]
    assert (c3["n_better"], c3["n_worse"], c3["verdict"]) == ("1", "8", "contradicted")
    assert float(c3["p_sign"]) == pytest.approx(20 / 512) and float(c3["mean_diff"]) == pytest.approx(10.1)
    # C4: final accuracy is 85 for every run but DP-SGD ε=3 seed 3 (never reached: 60) → 1/9/0
    c4 = got[("C4", "task=sst2 · method=denoise")]
    assert (c4["n_better"], c4["n_equal"], c4["n_worse"], c4["verdict"]) == ("1", "9", "0", "inconclusive")
    assert float(c4["mean_diff"]) == pytest.approx(2.5) and float(c4["p_sign"]) == 1.0
    md = (out / "reports" / "claims" / "claims.md").read_text()
    assert "## Claims" in md and re.search(r"\|\s+8 / 1 / 1\s+\|.*\|\s+0\.0391\s+\|\s+supported at α = 0\.05", md)
    assert "counts as train.steps + 1" in md and "4 non-tied pairs: smallest possible p 0.125)" in md
    tex = (out / "reports" / "claims" / "claims.tex").read_text()
    assert r"\label{tab:claims-c1}" in tex and "8 / 1 / 1" in tex and "≤" not in tex
    assert "supported" in res.output and "C1: denoise reaches 90% of the target" in res.output


def test_claims_in_the_plot_captions(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path, out = build_store(tmp_path)
    seen = []
    orig = Figure.supxlabel
    monkeypatch.setattr(Figure, "supxlabel", lambda self, t, **kw: seen.append(t) or orig(self, t, **kw))
    rep = rp.render(read_plan(out, "claims"), load_sweep(str(path)).report, tmp_path / "r")
    assert any(f.suffix == ".png" for f in rep.files) and seen
    assert "C1 denoise reaches 90%" in seen[0] and "supported (8/1/1, p=0.039)" in " ".join(seen[0].split())


def test_claim_outputs_are_byte_stable(tmp_path):
    path, out = build_store(tmp_path)
    block = load_sweep(str(path)).report
    a = rp.render(read_plan(out, "claims"), block, tmp_path / "a", plots=False)
    rp.render(read_plan(out, "claims"), block, tmp_path / "b", plots=False)
    for f in a.files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_missing_baseline_runs_are_counted_not_paired(tmp_path):
    path, out = build_store(tmp_path)
    store.atomic_write_json(store.run_dir(out, "c3dp0") / "meta.json", {"status": "failed"})
    rep = rp.build(read_plan(out, "claims"), load_sweep(str(path)).report)
    c1 = next(r for r in rep.claims if r.claim.index == 1)
    assert (c1.pairs, c1.unpaired, c1.better, c1.equal, c1.worse) == (9, 1, 7, 1, 1)


@pytest.mark.parametrize("claim,msg", [
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "final", "bettr": "max"}, r"unknown key\(s\) bettr"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "steps_to_ninety"}, "unknown measure"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}}, "'measure' is required"),
    ({"claim": "x", "baseline": {"optim.lr": 1}, "measure": "final"}, "not row/column keys"),
    ({"claim": "x", "baseline": {"method": "dpsdg"}, "measure": "final"}, "method=dpsdg matches no job"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "final", "pool": ["method"]}, "cannot pool"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "final", "alpha": 2}, "alpha must be"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "final", "better": "up"}, "better must be"),
    ({"claim": "x", "baseline": {"method": "dpsgd"}, "measure": "@35"}, "no finished run evaluated"),
    ({"claim": "x", "baseline": "dpsgd", "measure": "final"}, "baseline must be a mapping"),
])
def test_bad_claims_are_one_line_errors(tmp_path, claim, msg):
    data = yaml.safe_load(SWEEP)
    data["report"]["compare"] = [claim]
    path, out = build_store(tmp_path, yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(DpftError, match=msg):
        rp.build(read_plan(out, "claims"), load_sweep(str(path)).report)
    res = CliRunner().invoke(app, ["report", str(path), f"paths.output_dir={out}", "--no-plots"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: ")
