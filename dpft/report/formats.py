"""A built report as text: Markdown, LaTeX, CSV (table and claims) and a rich table for the
terminal. Byte-stable: rows and columns follow the plan's order and floats have fixed formats."""

from __future__ import annotations

import math

from dpft.report.claims import claim_header
from dpft.report.labels import fmt_label
from dpft.report.spec import Claim, Measure, ReportSpec
from dpft.report.tables import Report


GROUP_KEYS = ("method", "model", "task", "privacy", "optim", "logger", "debug")


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
