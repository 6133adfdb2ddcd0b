"""The table of a report: one cell per (row, column, measure) with mean, std, n and the paper's
value, and the caption that says what the numbers are."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft.errors import DpftError
from dpft.report.claims import ClaimResult, evaluate_claim
from dpft.report.collect import RunData, check_logged, load_runs, measure_value, privacy_note, set_targets
from dpft.report.labels import ordered_unique, same_label
from dpft.report.spec import Measure, ReportSpec, parse_report
from dpft.sweeps.plan import Job, Plan


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


def _paper_value(spec: ReportSpec, row: tuple, col: tuple, m: Measure) -> float:
    for p in spec.paper:
        if str(p.get("measure", spec.measures[0].spec)) != m.spec:
            continue
        keys = list(zip(spec.rows, row)) + list(zip(spec.cols, col))
        if all(k in p and same_label(p[k], v) for k, v in keys):
            return float(p["value"])
    return float("nan")


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


def build(plan: Plan, block: dict) -> Report:
    require_deps(plots=False)
    import pandas as pd

    spec = parse_report(block, plan)
    runs, missing, labels = load_runs(plan, spec)
    if not runs:
        raise DpftError(f"sweep {plan.name}: none of the {len(plan.jobs)} planned runs has finished in "
                        f"{plan.output_dir} (run `dpft sweep {plan.name}` first, or pull them with --from-wandb)")
    check_logged(spec, runs)
    claim_measures = [c.measure for c in spec.compare]
    target_desc = set_targets(spec, runs) if any(m.kind == "steps_to" for m in spec.measures + claim_measures) else ""

    row_of = lambda rid: tuple(labels[rid][k] for k in spec.rows)  # noqa: E731
    col_of = lambda rid: tuple(labels[rid][k] for k in spec.cols)  # noqa: E731
    row_keys = ordered_unique(row_of(j.run_id) for j in plan.jobs)
    col_keys = ordered_unique(col_of(j.run_id) for j in plan.jobs)
    expected: dict[tuple, int] = {}
    for j in plan.jobs:
        k = (row_of(j.run_id), col_of(j.run_id))
        expected[k] = expected.get(k, 0) + 1

    values: dict[tuple, list[float]] = {}
    for r in runs:
        for m in spec.measures:
            v = measure_value(r, m, spec.metric)
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
