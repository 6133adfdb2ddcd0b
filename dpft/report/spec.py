"""The ``report:`` block of a sweep file → a checked ``ReportSpec`` (measures, rows/cols, target,
curves) with its ``compare:`` claims. Every mistake is a one-line error naming the key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dpft.errors import DpftError
from dpft.report.labels import flat_config, fmt_label, label_of
from dpft.sweeps.plan import Job, Plan


REPORT_KEYS = ("title", "metric", "rows", "cols", "over", "measures", "target", "target_by", "scale", "digits",
               "bold", "labels", "paper", "curves", "better", "compare")

CLAIM_KEYS = ("claim", "baseline", "treatment", "measure", "better", "pool", "alpha")

CURVE_KEYS = ("hue", "panels", "metric", "improvement", "smooth")


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


def as_list(value, what: str) -> list[str]:
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
        if plan.jobs and not any(matches(j, where) for j in plan.jobs):
            raise DpftError("report.target: no job of the plan has " + where_text(where))
        return {"best": where}
    if not (target in ("task", "best") or (isinstance(target, (int, float)) and not isinstance(target, bool))):
        raise DpftError("report.target must be task (each run's task.target), best (best final mean in the sweep), "
                        "{best: {<key>: <value>}} (best among those runs) or a number")
    return target


def matches(job: Job, where: dict[str, str]) -> bool:
    flat = flat_config(job.config)
    return all(label_of(job, k, flat) == v for k, v in where.items())


def where_text(where: dict[str, str]) -> str:
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
    rows, cols = as_list(block.get("rows"), "rows"), as_list(block.get("cols"), "cols")
    over = as_list(block.get("over", ["seed"]), "over")
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
        target_by=as_list(block.get("target_by", ["task"] if "task" in rows + cols else []), "target_by"),
        bold=bold, labels={str(k): str(v) for k, v in (block.get("labels") or {}).items()}, paper=paper,
        curves=curves, better=better,
    )
    for p in paper:
        extra = set(p) - set(rows) - set(cols) - {"measure", "value", "source"}
        if extra or "value" not in p:
            raise DpftError(f"report.paper entry {p}: keys must be the row/column keys plus measure and value")
    spec.compare = _parse_claims(block.get("compare"), spec, scale, digits)
    return spec


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
        pool = as_list(item.get("pool"), f"compare[{i}].pool")
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
