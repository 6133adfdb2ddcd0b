"""``report.compare``: each claim's treatment runs paired with their baseline runs, grouped, and
tested (``dpft.report.stats``); ``claim_header`` says what the numbers mean."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dpft.errors import DpftError
from dpft.report.collect import RunData, measure_value
from dpft.report.labels import MISSING, flat_config, fmt_label, ordered_unique, same_label
from dpft.report.spec import Claim, Measure, ReportSpec
from dpft.report.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, verdict
from dpft.sweeps.plan import Plan


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
        return measure_value(run, m, metric)
    evals = run.evals(metric)
    if run.target is None or not evals:
        return float("nan")
    threshold = m.pct / 100.0 * run.target
    return next((float(r["step"]) for r in evals if r[metric] >= threshold), math.inf)


def _horizon(run: RunData) -> float:
    steps = flat_config(run.job.config).get("train.steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        return float(steps)
    return float(max((int(r["step"]) for r in run.records if "step" in r), default=0))


def _claim_matches(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(same_label(v, labels[k]) for k, v in sel.items())


def evaluate_claim(claim: Claim, spec: ReportSpec, plan: Plan, labels: dict[str, dict[str, str]],
                   runs: list[RunData]) -> list[ClaimResult]:
    where = f"report.compare[{claim.index}]"
    jobs = plan.jobs
    for what, sel in (("baseline", claim.baseline), ("treatment", claim.treatment)):
        for k, v in sel.items():
            seen = ordered_unique(labels[j.run_id][k] for j in jobs)
            if not any(same_label(v, lab) for lab in seen):
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
