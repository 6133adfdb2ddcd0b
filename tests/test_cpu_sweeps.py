"""CPU-scale sweep variants (`dpft/sweeps/<name>-cpu.yaml`): one per paper sweep, ≥ 3 seeds per
cell, real data from ../shared/data, stated budget and claims; their claims pair up on the real
plan (a fake run store under the real `dpft report`); a missing ../shared fails in one line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from dpft import store
from dpft.cli import app
from dpft.config import compose_run
from dpft.sweeps.plan import expand, read_plan
from dpft.sweeps.spec import PACKAGE_SWEEPS, load_sweep

NOT_PAPER = {"smoke", "default-seeds"}  # the README's smoke grid and the default job's seed study
PAPER = sorted(p.stem for p in PACKAGE_SWEEPS.glob("*.yaml") if not p.stem.endswith("-cpu") and p.stem not in NOT_PAPER)
CPU = sorted(p.stem for p in PACKAGE_SWEEPS.glob("*-cpu.yaml"))
TAG = re.compile(r"\[(P|R|N|U|Rv)\b")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)


def test_every_paper_sweep_has_a_cpu_variant():
    assert {"denoise-glue", "denoise-generation", "psasc", "anadp", "grape", "kappa"} <= set(PAPER)
    missing = [n for n in PAPER if f"{n}-cpu" not in CPU]
    assert not missing, f"paper sweeps without a CPU-scale variant: {missing}"


@pytest.mark.parametrize("name", CPU)
def test_cpu_variant_header_budget_and_claims(name):
    text = (PACKAGE_SWEEPS / f"{name}.yaml").read_text()
    assert text.startswith(f"# dpft sweep {name}") and f"dpft report {name}" in text
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "Compute budget" in header and re.search(r"≈ [\d.]+-[\d.]+\s+core-hours", header) \
        and re.search(r"Measured 20\d\d-\d\d-\d\d", header), f"{name}: the header must state a measured budget"
    assert "docs/benchmarks.md" in header, f"{name}: cite the measurement the protocol rests on"
    claims = load_sweep(name).report.get("compare") or []
    assert claims, f"{name}: a CPU study states the claims it tests"
    for c in claims:
        assert TAG.search(c["claim"]), f"{name}: claim without a provenance tag: {c['claim']}"


@pytest.mark.parametrize("name", CPU)
def test_cpu_variant_has_three_seeds_per_cell_and_real_data(name):
    sweep = load_sweep(name)
    points, axes = expand(sweep)
    cells: dict[tuple, set] = {}
    for p in points:
        kv = dict(o.split("=", 1) for o in p)
        cells.setdefault(tuple(kv.get(a) for a in axes if a != "seed"), set()).add(kv["seed"])
        assert kv["train.steps"] == "20", "σ is calibrated for the steps set here"
        assert kv["task.data_dir"].startswith("../shared/data/"), "real data from ../shared/data"
        assert "train.eval_every" in kv
    assert min(len(s) for s in cells.values()) >= 3
    # one job per grid block composes (all of them: the slow test below, and test_sweep's checks)
    firsts = {tuple(sorted(o.split("=", 1)[0] for o in p)): p for p in points}  # one per set of keys (block)
    for p in firsts.values():
        cfg = compose_run(p).cfg
        assert cfg.train.steps == 20 and cfg.model.name in ("minilm", "smollm2-135m")


def test_a_missing_shared_folder_fails_each_job_in_one_line(tmp_path):
    """Sweeps read ../shared relative to the directory they run from: elsewhere a job must stop at
    once with the path, not train on something else."""
    first = expand(load_sweep("kappa-cpu"))[0][0]
    res = CliRunner().invoke(app, ["train", *first, "logger=none", f"paths.output_dir={tmp_path / 'out'}"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: task.data_dir ../shared/data/sst2 does not exist or is not a directory"


def _fake_metrics(job, metric: str) -> list[dict]:
    """A rising curve per run with a run-dependent slope, so some pairs win, some lose, some tie."""
    h = int(hashlib.sha256(job.run_id.encode()).hexdigest()[:8], 16)
    slope, every = 0.01 + (h % 7) * 0.004, int(job.config["train"]["eval_every"])
    recs = []
    for step in range(1, 21):
        rec = {"step": step, "train/loss": 0.6, "train/improvement": (h % 5 - 1) * 1e-3,
               "method/layers_denoised": float(h % 3)}
        if step % every == 0:
            rec[metric] = round(0.5 + slope * step, 3) if metric == "eval/accuracy" else round(5 + 40 * slope * step, 2)
        recs.append(rec)
    return recs


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "norm-correction-cpu" else [pytest.mark.slow])
                                  for n in CPU])
def test_cpu_variant_dry_run_and_its_claims_pair_up(name, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", name, "--dry-run", f"paths.output_dir={out}"])
    assert res.exit_code == 0, res.output
    plan = read_plan(out, name)
    seeds: dict[tuple, set] = {}
    for j in plan.jobs:
        seeds.setdefault(tuple(v for k, v in j.axes.items() if k != "seed"), set()).add(j.config["seed"])
    assert min(len(s) for s in seeds.values()) >= 3
    metric = load_sweep(name).report["metric"]
    for job in plan.jobs:
        d = store.run_dir(out, job.run_id)
        d.mkdir(parents=True)
        store.atomic_write_text(d / "config.yaml", yaml.safe_dump(job.config))
        recs = _fake_metrics(job, metric)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        store.atomic_write_json(d / "summary.json", {"run_id": job.run_id})
        store.atomic_write_json(d / "meta.json", {"run_id": job.run_id, "status": "done"})
    res = CliRunner().invoke(app, ["report", name, f"paths.output_dir={out}", "--no-plots"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO((out / "reports" / name / f"{name}-claims.csv").read_text())))
    assert {r["claim_id"] for r in rows} == {f"C{i + 1}" for i in range(len(load_sweep(name).report["compare"]))}
    for r in rows:  # every run finished: every treatment run has its baseline partner
        assert r["unpaired"] == "0" and int(r["pairs"]) >= 3, r
        assert int(r["n_better"]) + int(r["n_equal"]) + int(r["n_worse"]) == int(r["pairs"])
