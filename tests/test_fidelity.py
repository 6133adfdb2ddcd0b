"""Method and sweep fidelity (issue 17): every statement about a paper in a sweep header carries a
provenance tag, every sweep composes the per-task recipe its header states, the comparison rows
that isolate each paper's claim exist, and `report.target: {best: {...}}` takes its target from
the baseline rows only."""

from __future__ import annotations

import math
import re

import pytest
from typer.testing import CliRunner

from dpft import report as rp
from dpft.cli import app
from dpft.config import compose_run
from dpft.errors import DpftError
from dpft.sweeps.plan import expand, read_plan
from dpft.sweeps.spec import PACKAGE_SWEEPS, load_sweep

PAPER_SWEEPS = ["kappa", "norm-correction", "denoise-glue", "denoise-generation", "denoise-ablation", "psasc",
                "anadp", "grape"]
ALL = sorted(p.stem for p in PACKAGE_SWEEPS.glob("*.yaml"))

# --------------------------------------------------------------------------- provenance tags

# A sentence that attributes something to a paper, its code, its figures or a recipe from the
# literature. "Not a paper table" (smoke, default-seeds) is the one negative statement allowed.
ATTRIBUTION = re.compile(r"\b(paper|papers|theorem|figure|fig\.|table \d|arxiv|authors?'?|the code|code's|"
                         r"li et al|xia et al|fastdp|reviews?|tuned on|sweeps about|published)\b", re.I)
TAG = re.compile(r"\[(P|R|U|N)\b[^\]]*\]")
EXEMPT = re.compile(r"not a paper table", re.I)


def header(text: str) -> str:
    """The leading comment block, without kappa.yaml's sweep-file format documentation."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if "---- sweep file format" in line:
            break
        if line[1:].strip().startswith("dpft "):  # a command line, not a statement
            continue
        lines.append(line[1:].strip())
    return " ".join(lines)


def untagged(text: str) -> list[str]:
    """Sentences (split at '. ' and '; ') that attribute something to a paper without a tag.
    Command lines (`dpft ...`) are not statements."""
    out = []
    text = re.sub(r"\b(Fig|e\.g|i\.e|et al|vs|cf)\. ", lambda m: m.group(0)[:-1] + "\u00a0", text)
    for sentence in re.split(r"(?<=[.;]) +", text):
        s = re.sub(r"`[^`]*`", "", sentence)
        if s.strip().startswith("dpft ") or EXEMPT.search(s):
            continue
        if ATTRIBUTION.search(s) and not TAG.search(s):
            out.append(sentence.strip())
    return out


def test_tag_check_catches_the_untagged_statements_issue_17_found():
    """The checker fails on sentences of the headers before issue 17 (so it can fail), and passes
    their tagged rewrites."""
    old = [
        "The paper uses κ = 1.02, tuned on SST-2, and sweeps about 1.01-1.05; κ = 1.0 admits noise spikes.",
        "Denoise ablation: step C, norm correction D ← D·‖G‖/‖D‖ (arXiv 2510.01137, its Theorem 1).",
        "without it the curves are inconsistent or negative (its Figure 3).",
        "DP-GRAPE (arXiv 2506.15588; algorithm from the authors' code, see dpft/methods/grape.py) vs DP-Adam.",
        "Recipe: Li et al. GLUE settings (C = 0.1, δ = N^-1.1, AdamW 5e-4, linear decay).",
        "The paper used image data; its recipe, tables and defaults are [U].",
    ]
    for sentence in old:
        assert untagged(sentence), sentence
    assert not untagged("κ = 1.02 is the paper's default according to the notes [N]. Ours [R]; theirs [U].")
    assert not untagged("dpft sweep smoke   Not a paper table: DP-SGD vs non-private.")


@pytest.mark.parametrize("name", ALL)
def test_every_paper_statement_in_a_sweep_header_is_tagged(name):
    text = (PACKAGE_SWEEPS / f"{name}.yaml").read_text()
    bad = untagged(header(text))
    assert not bad, f"{name}.yaml: untagged paper statement(s): {bad}"
    if name in PAPER_SWEEPS:
        assert "Provenance tags" in header(text), f"{name}.yaml must say what its tags mean"


def test_method_configs_and_readme_method_section_are_tagged():
    from dpft.config import CONF_DIR

    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        comments = " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)
        bad = untagged(comments)
        assert not bad, f"{path.name}: untagged paper statement(s): {bad}"
    readme = (PACKAGE_SWEEPS.parents[1] / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|") and "arXiv" in line]
    assert table and all(TAG.search(line) for line in table), "every paper row of the README's method table needs a tag"
    # the README's example `paper:` cell must not look like a published number
    assert "value: 93.1" not in readme


# --------------------------------------------------------------------------- recipes stated per task

TASK_RECIPE = re.compile(r"\b(SST-2|QNLI|QQP|MNLI|E2E|DART) B = (\d+), (\d+) epochs"
                         r"(?:, lr (\d(?:\.\d+)?e-\d) (constant|linear))?(?:, δ = (\d(?:\.\d+)?e-\d))?")
FIXED_RECIPE = re.compile(r"B = (\d+), (\d+) steps for every task")


def _first_jobs(name: str) -> dict[tuple, list[str]]:
    """One override list per (task, epochs-or-steps variant, method): what the header speaks about."""
    points, _ = expand(load_sweep(name))
    seen: dict[tuple, list[str]] = {}
    for p in points:
        kv = dict(o.split("=", 1) for o in p if "=" in o)
        key = (kv.get("task"), kv.get("train.epochs", "null"), kv.get("method"), kv.get("model"))
        seen.setdefault(key, p)
    return seen


@pytest.mark.parametrize("name", ALL)
def test_per_task_recipes_in_headers_are_what_the_jobs_compose(name):
    """`<TASK> B = b, e epochs[, lr x schedule][, δ = d]` and `B = b, n steps for every task` in a
    header are checked against the composed config of a job of each (task, variant, method)."""
    head = header((PACKAGE_SWEEPS / f"{name}.yaml").read_text())
    stated = {m.group(1).replace("-", "").lower(): m.groups()[1:] for m in TASK_RECIPE.finditer(head)}
    fixed = FIXED_RECIPE.search(head)
    if not stated and not fixed:
        pytest.skip(f"{name}: no per-task recipe stated")
    checked = 0
    for (task, epochs, _, _), overrides in _first_jobs(name).items():
        cfg = compose_run(overrides).cfg
        if epochs != "null" and task in stated:
            b, e, lr, sched, delta = stated[task]
            assert cfg.train.batch_size == int(b) and float(cfg.train.epochs) == float(e), (name, task)
            assert cfg.train.steps is None, (name, task)
            if lr:
                assert float(cfg.optim.lr) == float(lr) and cfg.train.lr_schedule == sched, (name, task)
            if delta:
                assert float(cfg.privacy.delta) == float(delta), (name, task)
            checked += 1
        elif epochs == "null" and fixed:
            assert cfg.train.batch_size == int(fixed.group(1)) and cfg.train.steps == int(fixed.group(2)), (name, task)
            checked += 1
    assert checked >= len(stated), f"{name}: a stated task recipe has no job"


# --------------------------------------------------------------------------- the rows that isolate each claim


def _points(name):
    points, _ = expand(load_sweep(name))
    return [dict(o.split("=", 1) for o in p if "=" in o) for p in points]


def test_grape_sweep_code_faithful_std_ablation_column_and_constant_lr():
    pts = _points("grape")
    ranks = {(p["method.rank"], p.get("method.proj_std")) for p in pts}
    assert ("null", None) in ranks  # DP-Adam
    for r in ("16", "64", "256"):
        assert (r, "1/r") in ranks and (r, "1/sqrt_r") in ranks
    text = (PACKAGE_SWEEPS / "grape.yaml").read_text()
    assert "lr·√r" not in text and "exactly the authors" not in text
    for p in (pts[0], pts[-1]):
        cfg = compose_run([f"{k}={v}" for k, v in p.items()]).cfg
        assert cfg.train.lr_schedule == "constant"
    from dpft.config import CONF_DIR

    assert "lr·√r" not in (CONF_DIR / "method" / "grape.yaml").read_text()
    import dpft.methods.grape as grape

    assert "exactly the code's method with lr" not in grape.__doc__


def test_psasc_sweep_has_sgd_rows_at_one_lr_and_an_r_axis():
    pts = _points("psasc")
    sgd = [p for p in pts if p.get("optim") == "sgd"]
    assert {p["method"] for p in sgd} == {"dpsgd", "psasc"}
    assert len({p["optim.lr"] for p in sgd}) == 1  # a fixed lr, where s acts
    assert len({p["method.s"] for p in sgd if p["method"] == "psasc"}) >= 2
    assert len({p["method.r"] for p in sgd if p["method"] == "psasc"}) >= 2
    adam = [p for p in pts if p.get("optim") is None and p["method"] == "psasc"]
    pairs = {(p["method.s"], p["method.r"]) for p in adam}
    assert {("0.1", "0.01"), ("1.0", "0.1")} <= pairs  # the pair the AdamW equivalence says is one algorithm
    head = header((PACKAGE_SWEEPS / "psasc.yaml").read_text())
    assert "cancels" in head and "plain SGD is [U]" in head
    import dpft.methods.psasc as psasc

    assert "the paper's update is plain SGD (" not in psasc.__doc__


def test_anadp_sweep_has_the_per_group_clipping_control_beside_every_dpsgd_cell():
    pts = _points("anadp")
    cell = lambda p: (p["task"], p["privacy.epsilon"], p["model.peft"], p["seed"])  # noqa: E731
    dpsgd = {cell(p) for p in pts if p["method"] == "dpsgd"}
    control = {cell(p) for p in pts if p["method"] == "anadp" and float(p["method.alpha"]) == 0.0}
    smoothed = {cell(p) for p in pts if p.get("method.importance") == "smoothed"}
    assert dpsgd and dpsgd == control == smoothed
    cfg = compose_run(["method=anadp", "method.alpha=0", "engine.grad_sample_mode=hooks"]).cfg
    assert cfg.method.alpha == 0


def test_denoise_sweeps_models_targets_and_ablation_axes():
    glue = _points("denoise-glue")
    assert {p["model"] for p in glue} == {"roberta-base", "roberta-large"}
    gen = _points("denoise-generation")
    assert gen[0]["model"].startswith(("qwen", "llama")) and "gpt2" in {p["model"] for p in gen}
    for name in ("denoise-glue", "denoise-generation", "psasc", "denoise-ablation"):
        block = load_sweep(name).report
        assert block["target"] == {"best": {"method": "dpsgd"}}, name
        assert "DP-SGD" in header((PACKAGE_SWEEPS / f"{name}.yaml").read_text()), name
    abl = _points("denoise-ablation")
    assert {p.get("method.shrinker") for p in abl} >= {"optimal", "spike", "hard"}
    assert any(p.get("method.include_head", "").lower() == "false" for p in abl)
    assert any(p.get("method.empty_policy") == "zero" for p in abl)
    kappas = {float(p["method.kappa"]) for p in abl if "method.kappa" in p}
    assert {1.0, 1.01} <= kappas
    assert "Li et al.'s recipe" not in (PACKAGE_SWEEPS / "denoise-glue.yaml").read_text()


# --------------------------------------------------------------------------- report target: baseline rows only


def test_report_target_best_among_baseline_rows_only(tmp_path, monkeypatch):
    from test_report import EVAL_STEPS, SWEEP_FILE, accuracy, build_store

    monkeypatch.chdir(tmp_path)
    build_store(tmp_path / "outputs")
    plan = read_plan(tmp_path / "outputs", "fixture")
    base = dict(load_sweep(str(SWEEP_FILE)).report, target_by=["task", "privacy.epsilon"], paper=[])
    # ε = 3: the best cell overall is DP-SGD's (ceiling 0.90); restricted to denoise it is denoise's
    best_all = sum(accuracy("dpsgd", 3, s, 200) for s in (0, 2)) / 2
    best_dn = sum(accuracy("denoise", 3, s, 200) for s in range(3)) / 3
    rep = rp.build(plan, dict(base, target={"best": {"method": "denoise"}}))
    assert f"sst2 3 {best_dn:.4g}" in rep.caption and f"{best_all:.4g}" not in rep.caption
    assert "among the runs with method = denoise" in rep.caption
    cells = rep.cells.set_index(["privacy.epsilon", "method", "measure"])
    first = [next(st for st in EVAL_STEPS if accuracy("dpsgd", 3, s, st) >= 0.9 * best_dn) for s in (0, 2)]
    assert cells.loc[("3", "dpsgd", "steps_to_90")]["mean"] == pytest.approx(sum(first) / 2)
    # ε = 8 has no finished DP-SGD run: with the baseline restriction there is no target there
    rep = rp.build(plan, dict(base, target={"best": {"method": "dpsgd"}}))
    cells = rep.cells.set_index(["privacy.epsilon", "method", "measure"])
    assert math.isnan(cells.loc[("8", "denoise", "steps_to_90")]["mean"])
    assert not math.isnan(cells.loc[("3", "denoise", "steps_to_90")]["mean"])
    # plain `best` would have used denoise's own ε = 8 runs
    rep = rp.build(plan, dict(base, target="best"))
    assert not math.isnan(rep.cells.set_index(["privacy.epsilon", "method", "measure"])
                          .loc[("8", "denoise", "steps_to_90")]["mean"])


@pytest.mark.parametrize("target,msg", [({"best": {"method": "sgd"}}, "no job of the plan has method = sgd"),
                                        ({"best": "dpsgd"}, "{best: {<config key>: <value>"),
                                        ({"worst": {"method": "dpsgd"}}, "{best: {<config key>: <value>"),
                                        (True, "report.target")])
def test_bad_report_targets_are_one_line_errors(tmp_path, monkeypatch, target, msg):
    from test_report import SWEEP_FILE, build_store

    monkeypatch.chdir(tmp_path)
    build_store(tmp_path / "outputs")
    with pytest.raises(DpftError, match=re.escape(msg)):
        rp.build(read_plan(tmp_path / "outputs", "fixture"), dict(load_sweep(str(SWEEP_FILE)).report, target=target))
    if target == {"best": {"method": "sgd"}}:  # and through the CLI: one line, non-zero exit, nothing written
        import yaml

        data = yaml.safe_load(SWEEP_FILE.read_text())
        data["report"]["target"] = target
        path = tmp_path / "fixture.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        res = CliRunner().invoke(app, ["report", str(path), f"paths.output_dir={tmp_path / 'outputs'}"])
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output
        assert not (tmp_path / "outputs" / "reports").exists()


def test_cli_report_with_a_baseline_target_writes_its_caption(tmp_path, monkeypatch):
    """End to end: `dpft report FILE` with `target: {best: {method: dpsgd}}` writes the table whose
    caption names the baseline restriction and the target value it used."""
    import yaml
    from test_report import SWEEP_FILE, accuracy, build_store

    monkeypatch.chdir(tmp_path)
    build_store(tmp_path / "outputs")
    data = yaml.safe_load(SWEEP_FILE.read_text())
    data["report"].update(target={"best": {"method": "dpsgd"}}, target_by=["privacy.epsilon"], paper=[])
    path = tmp_path / "fixture.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    res = CliRunner().invoke(app, ["report", str(path), f"paths.output_dir={tmp_path / 'outputs'}"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "outputs" / "reports" / "fixture" / "fixture.md").read_text()
    best = sum(accuracy("dpsgd", 3, s, 200) for s in (0, 2)) / 2
    assert "among the runs with method = dpsgd per ε" in md and f"3 {best:.4g}" in md
