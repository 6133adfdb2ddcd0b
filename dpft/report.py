"""`dpft report NAME`: the runs of one sweep plan → Markdown / LaTeX / CSV tables and curves.

Only the run store is read (``outputs/runs/<run_id>/``), and only the run ids in the sweep's plan,
so other experiments in the same store never leak into a table. Every number is recomputed from
``metrics.jsonl`` (evaluation records), which makes runs pulled from W&B (`--from-wandb`) and
local runs indistinguishable. Outputs are byte-stable: rows and columns follow the plan's order,
floats have fixed formats, and nothing depends on time, paths or library-generated ids.

The ``report:`` block of a sweep file says what to tabulate; see ``dpft/sweeps/kappa.yaml``. Its
``compare:`` list states claims (treatment vs baseline rows, paired run for run) that are tested with
an exact sign test and a seeded bootstrap interval; see the README's "Claims" and any ``*-cpu.yaml``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft.errors import DpftError
from dpft.sweep import Job, Plan

REPORT_KEYS = ("title", "metric", "rows", "cols", "over", "measures", "target", "target_by", "scale", "digits",
               "bold", "labels", "paper", "curves", "better", "compare")
CLAIM_KEYS = ("claim", "baseline", "treatment", "measure", "better", "pool", "alpha")
CURVE_KEYS = ("hue", "panels", "metric", "improvement", "smooth")
GROUP_KEYS = ("method", "model", "task", "privacy", "optim", "logger", "debug")


# --------------------------------------------------------------------------- the report spec


@dataclass
class Measure:
    spec: str
    label: str
    kind: str  # final | best | at | steps_to | mean
    step: int | None = None
    pct: float | None = None
    key: str | None = None
    scale: float = 1.0
    digits: int = 1
    better: str = "max"


@dataclass
class ReportSpec:
    name: str
    title: str
    metric: str
    rows: list[str]
    cols: list[str]
    over: list[str]
    measures: list[Measure]
    target: Any
    target_by: list[str]
    bold: str
    labels: dict[str, str]
    paper: list[dict]
    curves: dict
    better: str = "max"
    auto_rows: list[str] = field(default_factory=list)
    compare: list["Claim"] = field(default_factory=list)

    def display(self, key: str) -> str:
        return self.labels.get(key, key)


def _as_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise DpftError(f"report.{what} must be a key or a list of keys")


def _measure(item, metric_scale: float, metric_digits: int, better: str) -> Measure:
    opts = {}
    if isinstance(item, dict):
        opts = dict(item)
        if "measure" not in opts:
            raise DpftError(f"report.measures entry {item} needs a 'measure' key")
        item = opts.pop("measure")
        unknown = set(opts) - {"label", "digits", "scale", "better"}
        if unknown:
            raise DpftError(f"report.measures entry {item}: unknown option(s) {', '.join(sorted(unknown))}")
    spec = str(item)
    if spec in ("final", "best"):
        m = Measure(spec, spec, spec, scale=metric_scale, digits=metric_digits, better=better)
    elif re.fullmatch(r"@\d+", spec):
        m = Measure(spec, f"step {spec[1:]}", "at", step=int(spec[1:]), scale=metric_scale, digits=metric_digits,
                    better=better)
    elif re.fullmatch(r"steps_to_\d+(\.\d+)?", spec):
        pct = float(spec[len("steps_to_"):])
        m = Measure(spec, f"steps to {pct:g}%", "steps_to", pct=pct, digits=0, better="min")
    elif spec.startswith("mean:") and len(spec) > 5:
        m = Measure(spec, f"mean {spec[5:]}", "mean", key=spec[5:], digits=4, better="max")
    else:
        raise DpftError(f"report.measures: unknown measure '{spec}'; use final, best, @<step>, steps_to_<p> "
                        "or mean:<metrics key>")
    m.label = str(opts.get("label", m.label))
    m.digits = int(opts.get("digits", m.digits))
    m.scale = float(opts.get("scale", m.scale))
    m.better = str(opts.get("better", m.better))
    if m.better not in ("max", "min"):
        raise DpftError(f"report.measures {spec}: better must be max or min")
    return m


def _parse_target(target, plan: Plan):
    """task | best | a number | {best: {<key>: <value>, ...}} (best final mean among the matching
    runs only, e.g. the same sweep's DP-SGD baseline rows)."""
    if isinstance(target, dict):
        where = target.get("best")
        if set(target) != {"best"} or not isinstance(where, dict) or not where \
                or any(isinstance(v, (dict, list)) for v in where.values()):
            raise DpftError("report.target: a mapping must be {best: {<config key>: <value>, ...}}, "
                            "e.g. {best: {method: dpsgd}}")
        where = {str(k): fmt_label(v) for k, v in where.items()}
        if plan.jobs and not any(_matches(j, where) for j in plan.jobs):
            raise DpftError("report.target: no job of the plan has " + _where_text(where))
        return {"best": where}
    if not (target in ("task", "best") or (isinstance(target, (int, float)) and not isinstance(target, bool))):
        raise DpftError("report.target must be task (each run's task.target), best (best final mean in the sweep), "
                        "{best: {<key>: <value>}} (best among those runs) or a number")
    return target


def _matches(job: Job, where: dict[str, str]) -> bool:
    flat = _flat(job.config)
    return all(label_of(job, k, flat) == v for k, v in where.items())


def _where_text(where: dict[str, str]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in where.items())


def parse_report(block: dict, plan: Plan) -> ReportSpec:
    unknown = sorted(set(block) - set(REPORT_KEYS))
    if unknown:
        raise DpftError(f"sweep {plan.name}: unknown report key(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(REPORT_KEYS)}")
    first = plan.jobs[0].config if plan.jobs else {}
    default_metric = "eval/" + str(first.get("task", {}).get("metric", "accuracy"))
    metric = str(block.get("metric", default_metric))
    scale = float(block.get("scale", 1))
    digits = int(block.get("digits", 1 if scale >= 100 else 4))
    better = str(block.get("better", "max"))
    if better not in ("max", "min"):
        raise DpftError("report.better must be max or min")
    measures = [_measure(m, scale, digits, better) for m in (block.get("measures") or ["final"])]
    labels = [m.label for m in measures]
    if len(set(labels)) != len(labels):
        raise DpftError(f"report.measures: two measures share a label ({', '.join(labels)})")
    rows, cols = _as_list(block.get("rows"), "rows"), _as_list(block.get("cols"), "cols")
    over = _as_list(block.get("over", ["seed"]), "over")
    target = _parse_target(block.get("target", "task"), plan)
    bold = str(block.get("bold", "column"))
    if bold not in ("column", "row", "none"):
        raise DpftError("report.bold must be column, row or none")
    curves = dict(block.get("curves") or {})
    bad = sorted(set(curves) - set(CURVE_KEYS))
    if bad:
        raise DpftError(f"report.curves: unknown key(s) {', '.join(bad)}; allowed: {', '.join(CURVE_KEYS)}")
    paper = block.get("paper") or []
    if not isinstance(paper, list) or not all(isinstance(p, dict) for p in paper):
        raise DpftError("report.paper must be a list of mappings {<row/col key>: value, measure: ..., value: ...}")
    spec = ReportSpec(
        name=plan.name, title=str(block.get("title", f"Sweep {plan.name}")), metric=metric, rows=rows, cols=cols,
        over=over, measures=measures, target=target,
        target_by=_as_list(block.get("target_by", ["task"] if "task" in rows + cols else []), "target_by"),
        bold=bold, labels={str(k): str(v) for k, v in (block.get("labels") or {}).items()}, paper=paper,
        curves=curves, better=better,
    )
    for p in paper:
        extra = set(p) - set(rows) - set(cols) - {"measure", "value", "source"}
        if extra or "value" not in p:
            raise DpftError(f"report.paper entry {p}: keys must be the row/column keys plus measure and value")
    spec.compare = _parse_claims(block.get("compare"), spec, scale, digits)
    return spec


# --------------------------------------------------------------------------- claims (report.compare)


@dataclass
class Claim:
    """One `report.compare` entry: does the treatment beat the baseline on `measure`, run for run?

    Each treatment run is paired with the baseline run that has the same label for every other
    report key (rows, cols, over: so the same seed, task, ε, ...); a key a block lacks (— on the
    baseline rows, e.g. a method's own knob) is not used for pairing. Pairs are grouped by the
    table's row/col keys, except `over` and `pool`, which are pooled into one test per group."""
    index: int
    text: str
    baseline: dict[str, Any]
    treatment: dict[str, Any]
    measure: Measure
    better: str
    pool: list[str]
    alpha: float

    @property
    def name(self) -> str:
        return f"C{self.index}"


def _claim_selector(value, where: str, keys: list[str], required: bool) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or not value:
        raise DpftError(f"{where} must be a mapping of row/column keys to values, e.g. {{method: dpsgd}}")
    bad = [str(k) for k in value if str(k) not in keys]
    if bad:
        raise DpftError(f"{where}: key(s) {', '.join(bad)} are not row/column keys of the report "
                        f"({', '.join(keys) or 'none'})")
    if any(isinstance(v, (list, dict)) for v in value.values()):
        raise DpftError(f"{where}: each key takes one value (one baseline per claim)")
    return {str(k): v for k, v in value.items()}


def _parse_claims(items, spec: ReportSpec, scale: float, digits: int) -> list[Claim]:
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise DpftError("report.compare must be a list of claims {claim: ..., baseline: {key: value}, measure: ...}")
    keys = spec.rows + spec.cols
    by_label = {m.label: m for m in spec.measures} | {m.spec: m for m in spec.measures}
    out = []
    for i, item in enumerate(items, 1):
        where = f"report.compare[{i}]"
        unknown = sorted(set(map(str, item)) - set(CLAIM_KEYS))
        if unknown:
            raise DpftError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CLAIM_KEYS)}")
        for req in ("claim", "baseline", "measure"):
            if item.get(req) in (None, ""):
                raise DpftError(f"{where}: '{req}' is required (claim: text with its provenance tag, "
                                "baseline: {key: value}, measure: a report measure)")
        baseline = _claim_selector(item["baseline"], f"{where}.baseline", keys, True)
        treatment = _claim_selector(item.get("treatment"), f"{where}.treatment", keys, False)
        if isinstance(item["measure"], (dict, list)):
            raise DpftError(f"{where}.measure: name one measure (final, best, @<step>, steps_to_<p>, mean:<key>)")
        mspec = str(item["measure"])
        try:
            measure = by_label.get(mspec) or _measure(mspec, scale, digits, spec.better)
        except DpftError as e:
            raise DpftError(f"{where}: {e}") from None
        better = str(item.get("better", measure.better))
        if better not in ("max", "min"):
            raise DpftError(f"{where}.better must be max or min, got {better!r}")
        pool = _as_list(item.get("pool"), f"compare[{i}].pool")
        bad = [k for k in pool if k not in keys + spec.over]
        if bad:
            raise DpftError(f"{where}.pool: {', '.join(bad)} not a row/column key ({', '.join(keys)}); "
                            f"{', '.join(spec.over) or 'nothing'} is pooled always")
        clash = [k for k in pool if k in baseline]
        if clash:
            raise DpftError(f"{where}.pool: cannot pool the compared key(s) {', '.join(clash)}")
        try:
            alpha = float(item.get("alpha", 0.05))
        except (TypeError, ValueError):
            alpha = float("nan")
        if not 0.0 < alpha < 1.0:
            raise DpftError(f"{where}.alpha must be a number in (0, 1), got {item.get('alpha')!r}")
        out.append(Claim(i, str(item["claim"]).strip(), baseline, treatment, measure, better,
                         [k for k in pool if k not in spec.over], alpha))
    return out


# --------------------------------------------------------------------------- labels


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def fmt_label(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip: 1.0, 1.02, 8.0
    return str(v)


def label_of(job: Job, key: str, flat: dict | None = None) -> str:
    flat = flat if flat is not None else _flat(job.config)
    if key in flat:
        return fmt_label(flat[key])
    if key in job.choices:
        return fmt_label(job.choices[key])
    node = job.config.get(key)
    if isinstance(node, dict) and "name" in node:
        return fmt_label(node["name"])
    return MISSING  # e.g. a method's own knob on a baseline row (a grid block without it)


MISSING = "—"


def _check_keys(keys, labels: dict[str, dict[str, str]]) -> None:
    for k in keys:
        if labels and all(lab[k] == MISSING for lab in labels.values()):
            raise DpftError(f"report key '{k}' is neither a config value nor a config group of this sweep's jobs")


def _ordered_unique(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _add_unlisted_axes(spec: ReportSpec, plan: Plan, labels: dict[str, dict[str, str]]) -> None:
    """A swept key that is not a row, column or aggregated key would silently be averaged into
    the cells: make it a row instead, and say so in the caption."""
    keys = spec.rows + spec.cols + spec.over
    for job in plan.jobs:
        for axis in job.axes:
            key = axis.lstrip("+~")
            if key in keys or key in spec.auto_rows:
                continue
            try:
                vals = {j.run_id: label_of(j, key) for j in plan.jobs}
            except DpftError:
                continue
            groups: dict[tuple, set] = {}
            for j in plan.jobs:
                groups.setdefault(tuple(labels[j.run_id][k] for k in keys), set()).add(vals[j.run_id])
            if any(len(s) > 1 for s in groups.values()):
                spec.auto_rows.append(key)
                spec.rows.append(key)
                for j in plan.jobs:
                    labels[j.run_id][key] = vals[j.run_id]


# --------------------------------------------------------------------------- per-run measures


@dataclass
class RunData:
    job: Job
    labels: dict[str, str]
    records: list[dict]
    target: float | None = None

    def evals(self, metric: str) -> list[dict]:
        """Records with a numeric value of `metric` (a value edited into a string is not a number)."""
        return sorted((r for r in self.records if isinstance(r.get(metric), (int, float))
                       and not isinstance(r.get(metric), bool)), key=lambda r: r["step"])


def _value(run: RunData, m: Measure, metric: str) -> float:
    nan = float("nan")
    evals = run.evals(metric)
    if m.kind == "final":
        return evals[-1][metric] * m.scale if evals else nan
    if m.kind == "best":
        vals = [r[metric] for r in evals]
        return (max(vals) if m.better == "max" else min(vals)) * m.scale if vals else nan
    if m.kind == "at":
        hit = [r[metric] for r in evals if int(r["step"]) == m.step]
        return hit[0] * m.scale if hit else nan
    if m.kind == "steps_to":
        if run.target is None:
            return nan
        threshold = m.pct / 100.0 * run.target
        for r in evals:
            if r[metric] >= threshold:
                return float(r["step"])
        return nan
    vals = [r[m.key] for r in run.records if isinstance(r.get(m.key), (int, float))]
    return sum(vals) / len(vals) * m.scale if vals else nan


def load_runs(plan: Plan, spec: ReportSpec) -> tuple[list[RunData], list[Job], dict[str, dict[str, str]]]:
    from dpft import store

    keys = _ordered_unique(spec.rows + spec.cols + spec.over + spec.target_by
                           + _as_list(spec.curves.get("hue"), "curves.hue")
                           + _as_list(spec.curves.get("panels"), "curves.panels"))
    labels = {}
    for job in plan.jobs:
        flat = _flat(job.config)
        labels[job.run_id] = {k: label_of(job, k, flat) for k in keys}
    _check_keys(keys, labels)
    _add_unlisted_axes(spec, plan, labels)
    runs, missing = [], []
    for job in plan.jobs:
        run = store.Store(plan.output_dir).run(job.run_id)
        if run.status() != "done":
            missing.append(job)
            continue
        target = _flat(job.config).get("task.target")
        runs.append(RunData(job, labels[job.run_id], run.metrics(),
                            float(target) if isinstance(target, (int, float)) else None))
    return runs, missing, labels


def _targets(spec: ReportSpec, runs: list[RunData]) -> str:
    """Set each run's steps-to-target reference; return the caption's description of it."""
    if isinstance(spec.target, (int, float)) and not isinstance(spec.target, bool):
        for r in runs:
            r.target = float(spec.target)
        return f"target = {spec.target:g}"
    if spec.target == "task":
        per = {}
        for r in runs:
            if r.target is not None:
                per.setdefault(r.labels["task"] if "task" in r.labels else label_of(r.job, "task"), r.target)
        desc = ", ".join(f"{k} {v:g}" for k, v in per.items()) or "none configured"
        return f"target = the task's configured reference task.target ({desc})"
    # best: the best mean final value of any cell (of the matching runs only), within each target_by group
    where = spec.target["best"] if isinstance(spec.target, dict) else None
    final = Measure("final", "final", "final", better=spec.better)
    pick = max if spec.better == "max" else min
    cells: dict[tuple, list[float]] = {}
    for r in runs:
        if where is not None and not _matches(r.job, where):
            continue
        v = _value(r, final, spec.metric)
        if not math.isnan(v):
            cells.setdefault(tuple(r.labels[k] for k in spec.target_by + spec.rows + spec.cols), []).append(v)
    best: dict[tuple, float] = {}
    for key, vals in cells.items():
        g = key[: len(spec.target_by)]
        mean = sum(vals) / len(vals)
        best[g] = pick(best[g], mean) if g in best else mean
    for r in runs:
        r.target = best.get(tuple(r.labels[k] for k in spec.target_by))
    by = " × ".join(spec.display(k) for k in spec.target_by) or "the whole sweep"
    desc = "; ".join(f"{' '.join(g)} {v:.4g}" if g else f"{v:.4g}" for g, v in best.items())
    among = f" among the runs with {_where_text(where)}" if where is not None else ""
    return f"target = best final mean {spec.metric} in this sweep{among} per {by} ({desc or 'no finished run'})"


# --------------------------------------------------------------------------- claim statistics

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # fixed: the same runs give the same interval, byte for byte


def sign_test_p(n_better: int, n_worse: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the non-tied pairs; 1 when there are none."""
    from scipy.stats import binomtest

    n = n_better + n_worse
    return 1.0 if n == 0 else float(binomtest(n_better, n, 0.5, alternative="two-sided").pvalue)


def smallest_p(n: int) -> float:
    """The smallest two-sided sign-test p-value that n non-tied pairs can give (all one way)."""
    return min(1.0, 2.0 * 0.5 ** n) if n > 0 else 1.0


def bootstrap_ci(diffs, confidence: float, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """BCa bootstrap interval of the mean (scipy.stats.bootstrap, seeded). NaN for fewer than two
    values; a point interval when every value is the same (the resamples cannot vary)."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.asarray(diffs, dtype="float64")
    if len(x) < 2:
        return float("nan"), float("nan")
    if float(np.ptp(x)) == 0.0:
        return float(x[0]), float(x[0])
    import warnings

    lo = hi = float("nan")
    for method in ("BCa", "percentile"):  # BCa is undefined for some tiny, lopsided samples
        kw = dict(confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, method=method, vectorized=True)
        with warnings.catch_warnings():  # a degenerate BCa warns and returns NaN: handled below
            warnings.simplefilter("ignore")
            try:
                res = bootstrap((x,), np.mean, rng=np.random.default_rng(seed), **kw)
            except TypeError:  # scipy < 1.15 names the generator random_state
                res = bootstrap((x,), np.mean, random_state=np.random.default_rng(seed), **kw)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            break
    return lo, hi


def verdict(n_better: int, n_worse: int, alpha: float) -> tuple[str, float, str]:
    """(supported | contradicted | inconclusive, sign-test p, one-line reason)."""
    p = sign_test_p(n_better, n_worse)
    n = n_better + n_worse
    if p <= alpha and n_better > n_worse:
        return "supported", p, f"supported at α = {alpha:g}"
    if p <= alpha and n_worse > n_better:
        return "contradicted", p, f"contradicted at α = {alpha:g} (the baseline is better)"
    why = f"inconclusive at this n (p > α = {alpha:g}"
    if n == 0:
        why += "; every pair is tied"
    elif smallest_p(n) > alpha:
        why += f"; {n} non-tied pair{'s' if n > 1 else ''}: smallest possible p {smallest_p(n):.3g}"
    return "inconclusive", p, why + ")"


@dataclass
class ClaimResult:
    claim: Claim
    group: str                  # the group's row/col labels, "all" when everything is pooled
    pairs: int
    better: int
    equal: int
    worse: int
    censored: tuple[int, int]   # pairs whose treatment / baseline run never reached the target
    mean: float                 # mean paired difference, treatment − baseline (table scale)
    ci: tuple[float, float]
    p: float
    verdict: str
    reason: str
    unpaired: int               # treatment runs without a finished, measurable baseline partner


def _claim_value(run: RunData, m: Measure, metric: str) -> float:
    """As the table's value, but a steps-to-target that never reached the target is +inf (censored:
    worse than any reached step) instead of missing."""
    if m.kind != "steps_to":
        return _value(run, m, metric)
    evals = run.evals(metric)
    if run.target is None or not evals:
        return float("nan")
    threshold = m.pct / 100.0 * run.target
    return next((float(r["step"]) for r in evals if r[metric] >= threshold), math.inf)


def _horizon(run: RunData) -> float:
    steps = _flat(run.job.config).get("train.steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        return float(steps)
    return float(max((int(r["step"]) for r in run.records if "step" in r), default=0))


def _claim_matches(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(_same_label(v, labels[k]) for k, v in sel.items())


def evaluate_claim(claim: Claim, spec: ReportSpec, plan: Plan, labels: dict[str, dict[str, str]],
                   runs: list[RunData]) -> list[ClaimResult]:
    where = f"report.compare[{claim.index}]"
    jobs = plan.jobs
    for what, sel in (("baseline", claim.baseline), ("treatment", claim.treatment)):
        for k, v in sel.items():
            seen = _ordered_unique(labels[j.run_id][k] for j in jobs)
            if not any(_same_label(v, lab) for lab in seen):
                raise DpftError(f"{where}.{what}: {k}={fmt_label(v)} matches no job of this sweep; "
                                f"{k} takes {', '.join(seen)}")
    base = [j for j in jobs if _claim_matches(claim.baseline, labels[j.run_id])]
    treat = [j for j in jobs if not _claim_matches(claim.baseline, labels[j.run_id])
             and _claim_matches(claim.treatment, labels[j.run_id])]
    if not treat:
        raise DpftError(f"{where}: no job is a treatment row (one that is not the baseline"
                        + (" and matches treatment" if claim.treatment else "") + "): nothing to compare with")
    pair_keys = [k for k in spec.rows + spec.cols + spec.over if k not in claim.baseline]
    group_keys = [k for k in spec.rows + spec.cols if k not in spec.over and k not in claim.pool]
    by_id = {r.job.run_id: r for r in runs}
    value = {r.job.run_id: _claim_value(r, claim.measure, spec.metric) for r in runs}
    groups: dict[tuple, list] = {}
    unpaired: dict[tuple, int] = {}
    for t in treat:
        tl = labels[t.run_id]
        partners = [b for b in base if all(labels[b.run_id][k] in (tl[k], MISSING) or tl[k] == MISSING
                                           for k in pair_keys)]
        if len(partners) > 1:
            first = labels[partners[0].run_id]
            differ = sorted({k for b in partners for k in pair_keys if labels[b.run_id][k] != first[k]})
            raise DpftError(f"{where}: job {t.describe()} pairs with {len(partners)} baseline jobs (they differ in "
                            f"{', '.join(differ)}); name that key in baseline or treatment")
        g = tuple(tl[k] for k in group_keys)
        groups.setdefault(g, [])
        b = partners[0] if partners else None
        vt = value.get(t.run_id, float("nan"))
        vb = value.get(b.run_id, float("nan")) if b is not None else float("nan")
        if math.isnan(vt) or math.isnan(vb):
            unpaired[g] = unpaired.get(g, 0) + (1 if t.run_id in by_id else 0)
            continue
        groups[g].append((by_id[t.run_id], vt, by_id[b.run_id], vb))
    out = []
    for g, pairs in groups.items():
        n_better = n_equal = n_worse = 0
        diffs, cens_t, cens_b = [], 0, 0
        for rt, vt, rb, vb in pairs:
            if vt == vb:
                n_equal += 1
            elif (vt > vb) == (claim.better == "max"):
                n_better += 1
            else:
                n_worse += 1
            cens_t += math.isinf(vt)
            cens_b += math.isinf(vb)
            # a censored steps-to-target counts as train.steps + 1 in the mean: a lower bound
            st = _horizon(rt) + 1 if math.isinf(vt) else vt
            sb = _horizon(rb) + 1 if math.isinf(vb) else vb
            diffs.append(st - sb)
        v, p, reason = verdict(n_better, n_worse, claim.alpha)
        mean = sum(diffs) / len(diffs) if diffs else float("nan")
        label = " · ".join(f"{spec.display(k)}={x}" for k, x in zip(group_keys, g) if x != MISSING) or "all"
        out.append(ClaimResult(claim, label, len(pairs), n_better, n_equal, n_worse, (cens_t, cens_b), mean,
                               bootstrap_ci(diffs, 1.0 - claim.alpha), p, v, reason, unpaired.get(g, 0)))
    return out


def claim_header(claim: Claim, spec: ReportSpec) -> str:
    """What a claim's numbers mean, in one paragraph (the md/tex caption and the csv's columns)."""
    sel = lambda d: ", ".join(f"{spec.display(k)}={fmt_label(v)}" for k, v in d.items())  # noqa: E731
    treat = sel(claim.treatment) or "every non-baseline row"
    pooled = ", ".join(spec.display(k) for k in spec.over + claim.pool) or "nothing"
    m = claim.measure
    text = (f"{claim.name}: {claim.text} — {treat} vs baseline {sel(claim.baseline)}, paired on every other key; "
            f"measure {m.label} ({'higher' if claim.better == 'max' else 'lower'} is better); pooled over {pooled}. "
            f"better/equal/worse count the treatment's pairs; p: two-sided exact sign test on the non-tied pairs; "
            f"mean difference treatment − baseline with a {1 - claim.alpha:.0%} BCa bootstrap interval "
            f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); α = {claim.alpha:g}.")
    if m.kind == "steps_to":
        text += (" Never reached: censored, ordered worse than any reached step (and tied with another never"
                 " reached); in the mean difference it counts as train.steps + 1, a bound that understates"
                 " the difference.")
    return text


# --------------------------------------------------------------------------- tables


@dataclass
class Report:
    spec: ReportSpec
    plan: Plan
    cells: Any  # long DataFrame: rows, cols, measure, mean, std, n, expected, paper
    row_keys: list[tuple]
    col_keys: list[tuple]
    columns: list[tuple]  # (col labels..., measure label, is_paper)
    caption: str
    missing: list[Job]
    runs: list[RunData]
    files: list[Path] = field(default_factory=list)
    claims: list[ClaimResult] = field(default_factory=list)


def _same_label(value: Any, label: str) -> bool:
    """A paper entry's `privacy.epsilon: 3.0` matches the label of a config value 3."""
    if fmt_label(value) == label:
        return True
    try:
        return not isinstance(value, bool) and float(value) == float(label)
    except (TypeError, ValueError):
        return False


def _paper_value(spec: ReportSpec, row: tuple, col: tuple, m: Measure) -> float:
    for p in spec.paper:
        if str(p.get("measure", spec.measures[0].spec)) != m.spec:
            continue
        keys = list(zip(spec.rows, row)) + list(zip(spec.cols, col))
        if all(k in p and _same_label(p[k], v) for k, v in keys):
            return float(p["value"])
    return float("nan")


def build(plan: Plan, block: dict) -> Report:
    require_deps(plots=False)
    import pandas as pd

    spec = parse_report(block, plan)
    runs, missing, labels = load_runs(plan, spec)
    if not runs:
        raise DpftError(f"sweep {plan.name}: none of the {len(plan.jobs)} planned runs has finished in "
                        f"{plan.output_dir} (run `dpft sweep {plan.name}` first, or pull them with --from-wandb)")
    _check_logged(spec, runs)
    claim_measures = [c.measure for c in spec.compare]
    target_desc = _targets(spec, runs) if any(m.kind == "steps_to" for m in spec.measures + claim_measures) else ""

    row_of = lambda rid: tuple(labels[rid][k] for k in spec.rows)  # noqa: E731
    col_of = lambda rid: tuple(labels[rid][k] for k in spec.cols)  # noqa: E731
    row_keys = _ordered_unique(row_of(j.run_id) for j in plan.jobs)
    col_keys = _ordered_unique(col_of(j.run_id) for j in plan.jobs)
    expected: dict[tuple, int] = {}
    for j in plan.jobs:
        k = (row_of(j.run_id), col_of(j.run_id))
        expected[k] = expected.get(k, 0) + 1

    values: dict[tuple, list[float]] = {}
    for r in runs:
        for m in spec.measures:
            v = _value(r, m, spec.metric)
            if not math.isnan(v):
                values.setdefault((row_of(r.job.run_id), col_of(r.job.run_id), m.spec), []).append(v)

    records = []
    for row in row_keys:
        for col in col_keys:
            if (row, col) not in expected:
                continue
            for m in spec.measures:
                vals = values.get((row, col, m.spec), [])
                s = pd.Series(vals, dtype="float64")
                records.append({
                    **dict(zip(spec.rows, row)), **dict(zip(spec.cols, col)), "measure": m.spec,
                    "mean": s.mean() if len(s) else float("nan"),
                    "std": s.std(ddof=1) if len(s) > 1 else float("nan"),
                    "n": len(s), "expected": expected[(row, col)],
                    "paper": _paper_value(spec, row, col, m),
                })
    cells = pd.DataFrame.from_records(records)
    has_paper = {m.spec for m in spec.measures if cells.loc[cells["measure"] == m.spec, "paper"].notna().any()}
    columns = []
    for col in col_keys:
        for m in spec.measures:
            columns.append((*col, m.label, False))
            if m.spec in has_paper:
                columns.append((*col, m.label, True))

    metric_scale = next((m.scale for m in spec.measures if m.kind in ("final", "best", "at")), 1.0)
    n_over = sorted(set(expected.values()))
    over = ", ".join(spec.display(k) for k in spec.over) or "runs"
    parts = [
        f"{spec.title}.",
        f"{spec.metric}" + (f" ×{metric_scale:g}" if metric_scale != 1 else "")
        + f"; mean ± std over {over} (n = {'/'.join(str(n) for n in n_over)} planned per cell);"
        " (k/n): only k values (runs missing or failed, or target not reached); —: none.",
    ]
    if target_desc:
        parts.append(f"Steps to p%: first evaluation step with {spec.metric} ≥ p% × target; {target_desc}.")
    if spec.bold != "none":
        parts.append(f"Bold: best per {spec.bold}.")
    if has_paper:
        parts.append("(paper): the published value.")
    if spec.auto_rows:
        parts.append(f"Swept but not in the report's rows/cols, so added as rows: {', '.join(spec.auto_rows)}.")
    parts.append(f"{len(runs)}/{len(plan.jobs)} planned runs finished.")
    note = privacy_note(runs)
    if note:
        parts.append(note)
    claims = [res for c in spec.compare for res in evaluate_claim(c, spec, plan, labels, runs)]
    if claims and target_desc and not any(m.kind == "steps_to" for m in spec.measures):
        parts.append(f"Claims' steps to p%: {target_desc}.")
    return Report(spec, plan, cells, row_keys, col_keys, columns, " ".join(parts), missing, runs, claims=claims)


def privacy_note(runs) -> str | None:
    """What the table's ε means: a guarantee only for runs whose noise nobody can regenerate from
    the config (dpft/engine/noise.py)."""
    modes = set()
    for r in runs:
        flat = _flat(r.job.config)
        if flat.get("method.private", True):
            modes.add(flat.get("privacy.noise", "pre-hardening"))
    notes = []
    if "seeded" in modes:
        notes.append("SIMULATION: privacy.noise=seeded runs draw noise and batches from the config (seed, run "
                     "id); their ε is not a guarantee against anyone who knows the config.")
    if "pre-hardening" in modes:
        notes.append("Runs from before the noise hardening drew noise from the public seed: their ε is not a "
                     "guarantee.")
    return " ".join(notes) or None


def _logged_keys(runs: list[RunData]) -> set[str]:
    return {k for r in runs for rec in r.records for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _unknown_key(where: str, key: str, keys: set[str]) -> DpftError:
    import difflib

    near = difflib.get_close_matches(key, sorted(keys), n=1)
    prefix = key.split("/")[0] + "/" if "/" in key else ""
    shown = sorted(k for k in keys if k.startswith(prefix)) or sorted(keys)
    listed = ", ".join(shown[:15]) + (f", … ({len(shown) - 15} more)" if len(shown) > 15 else "")
    hint = f"did you mean {near[0]}? " if near else ""
    return DpftError(f"{where}: no finished run logged '{key}'; {hint}logged keys: {listed or 'none'}")


def _check_logged(spec: ReportSpec, runs: list[RunData]) -> None:
    """A typo in a metric key or an eval step no run has is an error, not a column of dashes."""
    keys = _logged_keys(runs)
    if spec.metric not in keys:
        raise _unknown_key("report.metric", spec.metric, keys)
    measures = [("report.measures", m) for m in spec.measures]
    measures += [(f"report.compare[{c.index}].measure", c.measure) for c in spec.compare]
    steps = sorted({int(r["step"]) for run in runs for r in run.evals(spec.metric)})
    for where, m in measures:
        if m.kind == "mean" and m.key not in keys:
            raise _unknown_key(f"{where} {m.spec}", m.key, keys)
        if m.kind == "at" and m.step not in steps:
            shown = ", ".join(map(str, steps[:20])) + (" …" if len(steps) > 20 else "")
            raise DpftError(f"{where} {m.spec}: no finished run evaluated {spec.metric} at step {m.step}; "
                            f"eval steps: {shown}")
    for opt in ("metric", "improvement"):
        key = spec.curves.get(opt)
        if key and str(key) not in keys:  # the default improvement key may be absent (no method logs it)
            raise _unknown_key(f"report.curves.{opt}", str(key), keys)


def _measure_by_label(spec: ReportSpec) -> dict[str, Measure]:
    return {m.label: m for m in spec.measures}


def _cell(rep: Report, row: tuple, column: tuple) -> dict | None:
    spec = rep.spec
    col, mlabel = column[: len(spec.cols)], column[len(spec.cols)]
    m = _measure_by_label(spec)[mlabel]
    sel = rep.cells
    mask = sel["measure"] == m.spec
    for k, v in zip(spec.rows, row):
        mask &= sel[k] == v
    for k, v in zip(spec.cols, col):
        mask &= sel[k] == v
    hit = sel[mask]
    return None if hit.empty else {**hit.iloc[0].to_dict(), "_m": m}


def _format(c: dict | None, paper: bool, latex: bool) -> str:
    dash = "--" if latex else "—"
    if c is None:
        return ""
    m = c["_m"]
    if paper:
        return dash if math.isnan(c["paper"]) else f"{c['paper']:.{m.digits}f}"
    if c["n"] == 0:
        return dash
    pm = " $\\pm$ " if latex else " ± "
    text = f"{c['mean']:.{m.digits}f}" + (f"{pm}{c['std']:.{m.digits}f}" if c["n"] > 1 else "")
    if c["n"] < c["expected"]:
        text += f" ({c['n']}/{c['expected']})"
    return text


def _bold_mask(rep: Report) -> list[list[bool]]:
    """Best mean per column, or per row among the columns of the same measure."""
    grid = [[_cell(rep, r, c) for c in rep.columns] for r in rep.row_keys]
    mean = [[(c["mean"] if c is not None and not col[-1] and c["n"] > 0 else float("nan"))
             for c, col in zip(row, rep.columns)] for row in grid]
    mask = [[False] * len(rep.columns) for _ in rep.row_keys]
    if rep.spec.bold == "none":
        return mask
    better = {i: _measure_by_label(rep.spec)[col[len(rep.spec.cols)]].better for i, col in enumerate(rep.columns)}
    groups: list[list[tuple[int, int]]] = []
    if rep.spec.bold == "column":
        groups = [[(i, j) for i in range(len(rep.row_keys))] for j in range(len(rep.columns))]
    else:
        for i in range(len(rep.row_keys)):
            by_measure: dict[str, list] = {}
            for j, col in enumerate(rep.columns):
                by_measure.setdefault(col[len(rep.spec.cols)], []).append((i, j))
            groups.extend(by_measure.values())
    for g in groups:
        vals = [(mean[i][j], (i, j)) for i, j in g if not math.isnan(mean[i][j])]
        if len(vals) < 2:
            continue
        if len({v for v, _ in vals}) == 1:
            continue  # all equal: nothing is best
        pick = max if better[g[0][1]] == "max" else min
        best = pick(v for v, _ in vals)
        for v, (i, j) in vals:
            if v == best:
                mask[i][j] = True
    return mask


def _column_titles(rep: Report) -> list[str]:
    spec = rep.spec
    single = len(spec.measures) == 1 and not any(c[-1] for c in rep.columns)
    out = []
    for col in rep.columns:
        parts = [v if k in GROUP_KEYS else f"{spec.display(k)}={v}" for k, v in zip(spec.cols, col)]
        if not single or not parts:
            parts.append(col[len(spec.cols)] + (" (paper)" if col[-1] else ""))
        out.append(" · ".join(parts))
    return out


def _frame(rep: Report, latex: bool):
    import pandas as pd

    data = [[_format(_cell(rep, r, c), c[-1], latex) for c in rep.columns] for r in rep.row_keys]
    index = pd.MultiIndex.from_tuples(rep.row_keys, names=[rep.spec.display(k) for k in rep.spec.rows]) \
        if rep.spec.rows else pd.Index(["all"])
    return pd.DataFrame(data, index=index, columns=range(len(rep.columns)))


def to_markdown(rep: Report) -> str:
    df = _frame(rep, latex=False)
    mask = _bold_mask(rep)
    for i in range(len(rep.row_keys)):
        for j in range(len(rep.columns)):
            if mask[i][j] and df.iat[i, j]:
                df.iat[i, j] = f"**{df.iat[i, j]}**"
    df.columns = _column_titles(rep)
    table = df.reset_index().to_markdown(index=False, disable_numparse=True)
    out = [f"# {rep.spec.title}", "", table, "", rep.caption, ""]
    if rep.missing:
        listed = ", ".join(f"`{j.run_id}` {j.describe()}" for j in rep.missing)
        out += [f"Runs not finished ({len(rep.missing)}): {listed}", ""]
    if rep.claims:
        out += ["## Claims", ""]
        for claim in rep.spec.compare:
            df = claims_frame(rep, claim)
            out += [claim_header(claim, rep.spec), "", df.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "≥": r"$\geq$",
        "×": r"$\times$", "—": "--", "κ": r"$\kappa$", "ε": r"$\varepsilon$", "·": r"$\cdot$", "Δ": r"$\Delta$",
        "δ": r"$\delta$",
        "σ": r"$\sigma$", "η": r"$\eta$", "τ": r"$\tau$", "∞": r"$\infty$", "α": r"$\alpha$", "≤": r"$\leq$",
        "−": "-", "<": r"$<$", ">": r"$>$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(rep: Report) -> str:
    import pandas as pd

    spec = rep.spec
    df = _frame(rep, latex=True)
    levels = []
    for col in rep.columns:
        parts = [v if k in GROUP_KEYS else f"{spec.display(k)}={v}" for k, v in zip(spec.cols, col)]
        parts.append(col[len(spec.cols)] + (" (paper)" if col[-1] else ""))
        levels.append(tuple(parts))
    if len(spec.measures) == 1 and not any(c[-1] for c in rep.columns) and spec.cols:
        levels = [lv[:-1] for lv in levels]
    df.columns = pd.MultiIndex.from_tuples(levels) if len(levels[0]) > 1 else pd.Index([lv[0] for lv in levels])
    mask = _bold_mask(rep)
    props = pd.DataFrame([["textbf:--rwrap;" if b else "" for b in row] for row in mask], index=df.index,
                         columns=df.columns)
    styler = df.style.apply(lambda _: props, axis=None)
    styler = styler.format_index(tex_escape, axis=0).format_index(tex_escape, axis=1)
    styler.index.names = [tex_escape(n) if n else n for n in df.index.names]
    text = styler.to_latex(hrules=True, caption=tex_escape(rep.caption), label=f"tab:{spec.name}",
                           position_float="centering", multirow_align="naive", multicol_align="c",
                           column_format="l" * df.index.nlevels + "r" * len(rep.columns))
    for claim in spec.compare if rep.claims else []:
        cdf = claims_frame(rep, claim)
        cdf.columns = [tex_escape(c) for c in cdf.columns]
        text += "\n" + cdf.style.hide(axis="index").format(tex_escape).to_latex(
            hrules=True, caption=tex_escape(claim_header(claim, spec)), label=f"tab:{spec.name}-{claim.name.lower()}",
            position_float="centering", column_format="l" + "r" * (len(cdf.columns) - 2) + "l")
    return text


def to_csv(rep: Report) -> str:
    df = rep.cells.copy()
    labels = {m.spec: m.label for m in rep.spec.measures}
    df.insert(df.columns.get_loc("measure") + 1, "label", df["measure"].map(labels))
    return df.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def _num(x: float, digits: int) -> str:
    return "—" if math.isnan(x) else f"{x:+.{digits}f}"


def claims_frame(rep: Report, claim: Claim):
    """One row per group: the paired counts, the mean difference with its interval, p and verdict."""
    import pandas as pd

    m, steps = claim.measure, claim.measure.kind == "steps_to"
    digits = max(m.digits, 1) if steps else m.digits
    rows = []
    for r in (x for x in rep.claims if x.claim is claim):
        ci = "" if math.isnan(r.ci[0]) else f" [{_num(r.ci[0], digits)}, {_num(r.ci[1], digits)}]"
        row = {"group": r.group, "pairs": str(r.pairs) + (f" (+{r.unpaired} unpaired)" if r.unpaired else ""),
               "better / equal / worse": f"{r.better} / {r.equal} / {r.worse}"}
        if steps:
            row["never reached (treatment / baseline)"] = f"{r.censored[0]} / {r.censored[1]}"
        row[f"mean diff [{1 - claim.alpha:.0%} CI]"] = _num(r.mean, digits) + ci
        row["sign p"] = "—" if not r.pairs else f"{r.p:.3g}"
        row["verdict"] = r.reason if r.pairs else "no pairs: runs missing"
        rows.append(row)
    return pd.DataFrame(rows)


def claims_csv(rep: Report) -> str:
    import pandas as pd

    recs = []
    sel = lambda d: ";".join(f"{k}={fmt_label(v)}" for k, v in d.items())  # noqa: E731
    for r in rep.claims:
        c = r.claim
        recs.append({
            "claim_id": c.name, "claim": c.text, "treatment": sel(c.treatment), "baseline": sel(c.baseline),
            "measure": c.measure.spec,
            "better": c.better, "pooled": ";".join(rep.spec.over + c.pool), "group": r.group, "pairs": r.pairs,
            "n_better": r.better, "n_equal": r.equal, "n_worse": r.worse,
            "censored_treatment": r.censored[0], "censored_baseline": r.censored[1], "unpaired": r.unpaired,
            "mean_diff": r.mean, "ci_low": r.ci[0], "ci_high": r.ci[1], "confidence": 1 - c.alpha,
            "p_sign": r.p if r.pairs else float("nan"), "alpha": c.alpha,
            "verdict": r.verdict if r.pairs else "no pairs",
        })
    return pd.DataFrame.from_records(recs).to_csv(index=False, float_format="%.6g", lineterminator="\n")


def claims_summary(rep: Report) -> list[str]:
    """One line per claim for the plots' captions."""
    lines = []
    for claim in rep.spec.compare:
        res = [r for r in rep.claims if r.claim is claim]
        parts = [f"{r.group}: {r.verdict if r.pairs else 'no pairs'} ({r.better}/{r.equal}/{r.worse}, p={r.p:.2g})"
                 for r in res]
        base = ", ".join(f"{k}={fmt_label(v)}" for k, v in claim.baseline.items())
        lines.append(f"{claim.name} {claim.text} — better/equal/worse vs {base}, sign test α={claim.alpha:g}: "
                     + "; ".join(parts))
    return lines


def rich_table(rep: Report):
    from rich.markup import escape
    from rich.table import Table

    df = _frame(rep, latex=False)
    mask = _bold_mask(rep)
    table = Table(title=rep.spec.title, caption=rep.caption, caption_justify="left")
    for name in df.index.names:
        table.add_column(name or "", style="cyan")
    for title in _column_titles(rep):
        table.add_column(title, justify="right")
    for i, key in enumerate(rep.row_keys):
        cells = [f"[bold green]{escape(v)}[/]" if mask[i][j] and v else escape(v) for j, v in enumerate(df.iloc[i])]
        table.add_row(*[escape(k) for k in (key if rep.spec.rows else ("all",))], *cells)
    if not rep.claims:
        return table
    from rich.console import Group

    parts = [table]
    for claim in rep.spec.compare:
        df = claims_frame(rep, claim)
        t = Table(title=escape(f"{claim.name}: {claim.text}"), caption=escape(claim_header(claim, rep.spec)),
                  caption_justify="left", title_justify="left")
        for c in df.columns:
            t.add_column(escape(c), justify="left" if c in ("group", "verdict") else "right")
        for _, row in df.iterrows():
            style = {"supported": "green", "contradicted": "red"}.get(str(row["verdict"]).split(":")[0], "")
            t.add_row(*[escape(str(v)) for v in row.iloc[:-1]], f"[{style}]{escape(row.iloc[-1])}[/]" if style
                      else escape(row.iloc[-1]))
        parts.append(t)
    return Group(*parts)


# --------------------------------------------------------------------------- curves


def _curve_frame(rep: Report, runs: list[RunData], key: str, evals_only: bool, smooth: int, hue, panels, scale: float):
    import pandas as pd

    rows = []
    for r in runs:
        recs = r.evals(key) if evals_only else sorted((x for x in r.records if isinstance(x.get(key), (int, float))),
                                                      key=lambda x: x["step"])
        if not recs:
            continue
        s = pd.Series([x[key] * scale for x in recs], index=[int(x["step"]) for x in recs], dtype="float64")
        if smooth > 1:
            s = s.rolling(smooth, min_periods=1).mean()  # per run, before averaging over seeds
        h = " · ".join(r.labels[k] for k in hue) or "all"
        p = " · ".join(f"{rep.spec.display(k)}={r.labels[k]}" for k in panels) or ""
        rows += [{"panel": p, "hue": h, "step": st, "value": v} for st, v in s.items()]
    return pd.DataFrame(rows, columns=["panel", "hue", "step", "value"])


# print resolution for a paper figure (the PDF beside each PNG is vector)
PLOT_DPI = 200


def plot_curves(rep: Report, runs: list[RunData], out_dir: Path) -> list[Path]:
    import matplotlib
    from matplotlib.figure import Figure

    spec = rep.spec
    cfg = spec.curves
    hue = _as_list(cfg.get("hue"), "curves.hue") or (spec.cols or spec.rows[-1:])
    panels = _as_list(cfg.get("panels"), "curves.panels") or [k for k in spec.rows if k not in hue]
    metric_scale = next((m.scale for m in spec.measures if m.kind in ("final", "best", "at")), 1.0)
    figures = [("metric", str(cfg.get("metric", spec.metric)), True, 1, metric_scale)]
    if cfg.get("improvement", "train/improvement"):
        figures.append(("improvement", str(cfg.get("improvement", "train/improvement")), False,
                        int(cfg.get("smooth", 1)), 1.0))
    hue_order = _ordered_unique(" · ".join(r.labels[k] for k in hue) or "all" for r in runs)
    written = []
    # Fixed metadata, hash salt and no dates: the same runs give byte-identical files.
    rc = {"svg.hashsalt": "dpft", "pdf.compression": 6, "font.size": 9, "axes.prop_cycle":
          matplotlib.rcParamsDefault["axes.prop_cycle"]}
    with matplotlib.rc_context(rc):
        for kind, key, evals_only, smooth, scale in figures:
            df = _curve_frame(rep, runs, key, evals_only, smooth, hue, panels, scale)
            if df.empty:
                continue
            agg = df.groupby(["panel", "hue", "step"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
            panel_order = _ordered_unique(df["panel"])
            ncols = min(3, len(panel_order))
            nrows = math.ceil(len(panel_order) / ncols)
            fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
            axes = fig.subplots(nrows, ncols, squeeze=False)
            colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
            for ax, panel in zip(axes.flat, panel_order):
                for hi, h in enumerate(hue_order):
                    d = agg[(agg["panel"] == panel) & (agg["hue"] == h)].sort_values("step")
                    if d.empty:
                        continue
                    color = colors[hi % len(colors)]
                    ax.plot(d["step"], d["mean"], color=color, label=h, marker="o" if evals_only else None,
                            markersize=3, linewidth=1.4)
                    sd = d["std"].fillna(0.0)
                    ax.fill_between(d["step"], d["mean"] - sd, d["mean"] + sd, color=color, alpha=0.2, linewidth=0)
                if kind == "improvement":
                    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
                ax.set_title(panel)
                ax.set_xlabel("step")
                ax.set_ylabel(key + (f" ×{scale:g}" if scale != 1 else ""))
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(panel_order):]:
                ax.set_visible(False)
            axes.flat[0].legend(title=" · ".join(spec.display(k) for k in hue), fontsize=8, title_fontsize=8)
            over = ", ".join(spec.display(k) for k in spec.over) or "runs"
            fig.suptitle(f"{key}: mean ± std over {over}" + (f", rolling mean of {smooth} steps" if smooth > 1 else ""),
                         fontsize=9)
            if rep.claims:
                import textwrap

                caption = "\n".join(textwrap.fill(line, width=int(48 * ncols)) for line in claims_summary(rep))
                fig.supxlabel(caption, fontsize=7, ha="left", x=0.01, multialignment="left")
            base = out_dir / f"{spec.name}-{kind}"
            fig.savefig(base.with_suffix(".png"), dpi=PLOT_DPI, metadata={"Software": None})
            fig.savefig(base.with_suffix(".pdf"), metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                             "Creator": None})
            written += [base.with_suffix(".png"), base.with_suffix(".pdf")]
    return written


# --------------------------------------------------------------------------- entry points


REPORT_DEPS = ("pandas", "tabulate", "jinja2", "scipy")  # md tables need tabulate, LaTeX jinja2, claims scipy


def require_deps(plots: bool = True) -> None:
    """`pip install -e .` leaves out the report extra: say so in one line instead of a traceback."""
    import importlib

    missing = []
    for mod in REPORT_DEPS + (("matplotlib",) if plots else ()):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise DpftError(f"dpft report needs {', '.join(missing)}, not installed: pip install -e \".[report]\" "
                        "(in a checkout) or pip install \"dpft[report]\"")


def render(plan: Plan, block: dict, out_dir: Path, plots: bool = True) -> Report:
    from dpft import store

    require_deps(plots)
    rep = build(plan, block)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = rep.spec.name
    outputs = [(".md", to_markdown(rep)), (".tex", to_latex(rep)), (".csv", to_csv(rep))]
    if rep.claims:
        outputs.append(("-claims.csv", claims_csv(rep)))
    for suffix, text in outputs:
        rep.files.append(store.ReportDir(out_dir).write(f"{name}{suffix}", text))
    if plots:
        rep.files += plot_curves(rep, rep.runs, out_dir)
    return rep


def pull_from_wandb(plan: Plan, project: str | None = None, entity: str | None = None, api=None) -> dict[str, int]:
    """Copy the plan's finished W&B runs into the local store (runs already done locally are left
    alone). W&B history is read with scan_history (every row, not the sampled history())."""
    from omegaconf import OmegaConf

    from dpft import store

    if api is None:
        try:
            import wandb
        except ImportError:
            raise DpftError("--from-wandb needs wandb installed") from None
        api = wandb.Api()
    first = plan.jobs[0].wandb if plan.jobs else {}
    project = project or first.get("project") or "dpft"
    entity = entity or first.get("entity")
    path = f"{entity}/{project}" if entity else project
    wanted = {j.run_id: j for j in plan.jobs}
    stats = {"pulled": 0, "already_local": 0, "not_finished": 0}
    try:
        remote = list(api.runs(path, filters={"config.dpft/run_id": {"$in": sorted(wanted)}}))
    except Exception as e:
        raise DpftError(f"could not list W&B runs of {path}: {' '.join(str(e).split())[:200]}") from None
    for run in remote:
        rid = (run.config or {}).get("dpft/run_id")
        if rid not in wanted:
            continue
        dest = store.Store(plan.output_dir).run(rid)
        if dest.status() == "done":
            stats["already_local"] += 1
            continue
        if getattr(run, "state", "finished") != "finished":
            stats["not_finished"] += 1
            continue
        config = {k: v for k, v in dict(run.config).items() if k != "dpft/run_id"}
        records = []
        for row in run.scan_history():
            rec = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            if "_step" in row:
                rec["step"] = int(row["_step"])
            records.append(rec)
        summary_src = getattr(run.summary, "_json_dict", None) or dict(run.summary)
        summary = {k[len("summary/"):]: v for k, v in summary_src.items() if k.startswith("summary/")}
        summary["privacy"] = {k[len("privacy/"):]: v for k, v in summary_src.items() if k.startswith("privacy/")}
        summary.update(run_id=rid, source="wandb")
        # a failed local attempt is kept under attempts/<k>/, as `dpft train` does
        dest.begin(OmegaConf.to_yaml(OmegaConf.create(config)), wanted[rid].overrides)
        dest.write_metrics(records)
        dest.write_summary(summary)
        dest.write_meta({
            "run_id": rid, "slug": wanted[rid].slug, "status": "done", "source": "wandb",
            "wandb_run_id": getattr(run, "id", None), "wandb_path": path, "overrides": wanted[rid].overrides,
        })
        stats["pulled"] += 1
    return stats
