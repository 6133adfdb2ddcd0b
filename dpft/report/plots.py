"""Curves of a report: the metric at each evaluation and the method's improvement per step, mean ±
std over the aggregated runs, one panel per row label; PNG and byte-stable PDF."""

from __future__ import annotations

import math
from pathlib import Path

from dpft.report.collect import RunData
from dpft.report.formats import claims_summary
from dpft.report.labels import ordered_unique
from dpft.report.spec import as_list
from dpft.report.tables import Report


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
    hue = as_list(cfg.get("hue"), "curves.hue") or (spec.cols or spec.rows[-1:])
    panels = as_list(cfg.get("panels"), "curves.panels") or [k for k in spec.rows if k not in hue]
    metric_scale = next((m.scale for m in spec.measures if m.kind in ("final", "best", "at")), 1.0)
    figures = [("metric", str(cfg.get("metric", spec.metric)), True, 1, metric_scale)]
    if cfg.get("improvement", "train/improvement"):
        figures.append(("improvement", str(cfg.get("improvement", "train/improvement")), False,
                        int(cfg.get("smooth", 1)), 1.0))
    hue_order = ordered_unique(" · ".join(r.labels[k] for k in hue) or "all" for r in runs)
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
            panel_order = ordered_unique(df["panel"])
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
