"""Write a report: the tables in every format and the curves, into one folder."""

from __future__ import annotations

from pathlib import Path

from dpft.report.formats import claims_csv, to_csv, to_latex, to_markdown
from dpft.report.plots import plot_curves
from dpft.report.tables import Report, build, require_deps
from dpft.sweeps.plan import Plan


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
