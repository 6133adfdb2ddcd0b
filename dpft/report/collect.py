"""Per-run data of a plan from the local store and the measures computed from it.

Only the run ids in the plan are read, and every number is recomputed from ``metrics.jsonl``
(evaluation records), so runs pulled from W&B and local runs are indistinguishable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpft.errors import DpftError
from dpft.report.labels import MISSING, flat_config, label_of, ordered_unique
from dpft.report.spec import Measure, ReportSpec, as_list, matches, where_text
from dpft.sweeps.plan import Job, Plan


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


def measure_value(run: RunData, m: Measure, metric: str) -> float:
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

    keys = ordered_unique(spec.rows + spec.cols + spec.over + spec.target_by
                           + as_list(spec.curves.get("hue"), "curves.hue")
                           + as_list(spec.curves.get("panels"), "curves.panels"))
    labels = {}
    for job in plan.jobs:
        flat = flat_config(job.config)
        labels[job.run_id] = {k: label_of(job, k, flat) for k in keys}
    _check_keys(keys, labels)
    _add_unlisted_axes(spec, plan, labels)
    runs, missing = [], []
    for job in plan.jobs:
        run = store.Store(plan.output_dir).run(job.run_id)
        if run.status() != "done":
            missing.append(job)
            continue
        target = flat_config(job.config).get("task.target")
        runs.append(RunData(job, labels[job.run_id], run.metrics(),
                            float(target) if isinstance(target, (int, float)) else None))
    return runs, missing, labels


def _check_keys(keys, labels: dict[str, dict[str, str]]) -> None:
    for k in keys:
        if labels and all(lab[k] == MISSING for lab in labels.values()):
            raise DpftError(f"report key '{k}' is neither a config value nor a config group of this sweep's jobs")


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


def set_targets(spec: ReportSpec, runs: list[RunData]) -> str:
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
        if where is not None and not matches(r.job, where):
            continue
        v = measure_value(r, final, spec.metric)
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
    among = f" among the runs with {where_text(where)}" if where is not None else ""
    return f"target = best final mean {spec.metric} in this sweep{among} per {by} ({desc or 'no finished run'})"


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


def check_logged(spec: ReportSpec, runs: list[RunData]) -> None:
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


def privacy_note(runs) -> str | None:
    """What the table's ε means: a guarantee only for runs whose noise nobody can regenerate from
    the config (dpft/engine/noise.py)."""
    modes = set()
    for r in runs:
        flat = flat_config(r.job.config)
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
