"""`dpft report NAME`: the runs of one sweep plan → Markdown / LaTeX / CSV tables and curves.

Only the run store is read (``outputs/runs/<run_id>/``), and only the run ids in the sweep's plan,
so other experiments in the same store never leak into a table. Every number is recomputed from
``metrics.jsonl`` (evaluation records), which makes runs pulled from W&B (`--from-wandb`) and
local runs indistinguishable. Outputs are byte-stable: rows and columns follow the plan's order,
floats have fixed formats, and nothing depends on time, paths or library-generated ids.

The ``report:`` block of a sweep file says what to tabulate; see ``dpft/sweeps/kappa.yaml``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft.errors import DpftError
from dpft.sweep import Job, Plan

REPORT_KEYS = ("title", "metric", "rows", "cols", "over", "measures", "target", "target_by", "scale", "digits",
               "bold", "labels", "paper", "curves", "better")
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
    return spec


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
        path = store.run_dir(plan.output_dir, job.run_id)
        if store.run_status(path) != "done":
            missing.append(job)
            continue
        target = _flat(job.config).get("task.target")
        runs.append(RunData(job, labels[job.run_id], store.read_metrics(path / "metrics.jsonl"),
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
    import pandas as pd

    spec = parse_report(block, plan)
    runs, missing, labels = load_runs(plan, spec)
    if not runs:
        raise DpftError(f"sweep {plan.name}: none of the {len(plan.jobs)} planned runs has finished in "
                        f"{plan.output_dir} (run `dpft sweep {plan.name}` first, or pull them with --from-wandb)")
    target_desc = _targets(spec, runs) if any(m.kind == "steps_to" for m in spec.measures) else ""

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
    return Report(spec, plan, cells, row_keys, col_keys, columns, " ".join(parts), missing, runs)


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
    return "\n".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "≥": r"$\geq$",
        "×": r"$\times$", "—": "--", "κ": r"$\kappa$", "ε": r"$\varepsilon$", "·": r"$\cdot$", "Δ": r"$\Delta$",
        "δ": r"$\delta$",
        "σ": r"$\sigma$", "η": r"$\eta$", "τ": r"$\tau$", "∞": r"$\infty$"}


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
    return styler.to_latex(hrules=True, caption=tex_escape(rep.caption), label=f"tab:{spec.name}",
                           position_float="centering", multirow_align="naive", multicol_align="c",
                           column_format="l" * df.index.nlevels + "r" * len(rep.columns))


def to_csv(rep: Report) -> str:
    df = rep.cells.copy()
    labels = {m.spec: m.label for m in rep.spec.measures}
    df.insert(df.columns.get_loc("measure") + 1, "label", df["measure"].map(labels))
    return df.to_csv(index=False, float_format="%.6g", lineterminator="\n")


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
    return table


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
            base = out_dir / f"{spec.name}-{kind}"
            fig.savefig(base.with_suffix(".png"), dpi=110, metadata={"Software": None})
            fig.savefig(base.with_suffix(".pdf"), metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                             "Creator": None})
            written += [base.with_suffix(".png"), base.with_suffix(".pdf")]
    return written


# --------------------------------------------------------------------------- entry points


def render(plan: Plan, block: dict, out_dir: Path, plots: bool = True) -> Report:
    from dpft import store

    rep = build(plan, block)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = rep.spec.name
    for suffix, text in ((".md", to_markdown(rep)), (".tex", to_latex(rep)), (".csv", to_csv(rep))):
        store.atomic_write_text(out_dir / f"{name}{suffix}", text)
        rep.files.append(out_dir / f"{name}{suffix}")
    if plots:
        rep.files += plot_curves(rep, rep.runs, out_dir)
    return rep


def pull_from_wandb(plan: Plan, project: str | None = None, entity: str | None = None, api=None) -> dict[str, int]:
    """Copy the plan's finished W&B runs into the local store (runs already done locally are left
    alone). W&B history is read with scan_history (every row, not the sampled history())."""
    from omegaconf import OmegaConf

    from dpft import store
    from dpft.run import _archive_previous

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
        dest = store.run_dir(plan.output_dir, rid)
        if store.run_status(dest) == "done":
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
        _archive_previous(dest)  # a failed local attempt is kept under attempts/<k>/, as `dpft train` does
        dest.mkdir(parents=True, exist_ok=True)
        store.atomic_write_text(dest / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
        store.atomic_write_text(dest / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(wanted[rid].overrides)))
        store.atomic_write_text(dest / "metrics.jsonl", "".join(
            json.dumps(store._jsonable(r), sort_keys=True) + "\n" for r in records))
        store.atomic_write_json(dest / "summary.json", summary)
        store.atomic_write_json(dest / "meta.json", {
            "run_id": rid, "slug": wanted[rid].slug, "status": "done", "source": "wandb",
            "wandb_run_id": getattr(run, "id", None), "wandb_path": path, "overrides": wanted[rid].overrides,
        })
        stats["pulled"] += 1
    return stats
