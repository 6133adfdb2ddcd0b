"""Find and compare runs in the store without opening hash-named folders: what `dpft runs` and
`dpft diff` print. Reads only what the store's run directories hold (meta, summary, config, the
tail of the metrics); imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft import store
from dpft.errors import DpftError


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"privacy": {"epsilon": 3}} → {"privacy.epsilon": 3}; lists stay values."""
    if not isinstance(obj, dict):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


@dataclass
class RunRecord:
    path: Path
    run_id: str
    slug: str
    status: str
    epsilon: Any  # ε spent: the summary's, or the last logged one for an unfinished run
    metric: str | None
    final: Any
    age_s: float
    step: int
    steps: int | None
    meta: dict = field(repr=False, default_factory=dict)
    summary: dict = field(repr=False, default_factory=dict)
    _config: dict | None = field(repr=False, default=None)

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = flatten(store.RunDir(self.path).config())
        return self._config

    def value(self, key: str) -> tuple[bool, Any]:
        """(found, value) of a filter key: a config group choice (method=denoise), a config key
        (privacy.epsilon), or status / slug / run_id."""
        if key in ("status", "slug", "run_id"):
            return True, getattr(self, key)
        choices = self.meta.get("choices") or {}
        if key in choices:
            return True, choices[key]
        cfg = self.config
        if key in cfg:
            return True, cfg[key]
        return False, None


def record(run: store.RunDir) -> RunRecord:
    meta = run.meta() or {}
    summary = run.summary() or {}
    status = run.status() or "?"
    if status == "running" and run.owner() is None:
        status = "stale"  # says running, but no process owns the directory (killed without cleanup)
    last = run.tail_record()
    eps = (summary.get("privacy") or {}).get("epsilon") if summary else None
    if eps is None:
        rec = run.tail_record("privacy/epsilon")
        eps = rec.get("privacy/epsilon") if rec else None
    return RunRecord(path=run.path, run_id=run.run_id, slug=str(meta.get("slug") or summary.get("slug") or "?"),
                     status=status, epsilon=eps, metric=summary.get("metric"), final=summary.get("final"),
                     age_s=run.age_s(), step=int(last["step"]) if last else 0,
                     steps=summary.get("steps") or meta.get("steps"), meta=meta, summary=summary)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or str(a).lower() == str(b).lower()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return str(a) == str(b)


def parse_filters(tokens: list[str]) -> list[tuple[str, Any]]:
    import yaml

    out = []
    for tok in tokens:
        key, eq, raw = tok.partition("=")
        if not eq or not key:
            raise DpftError(f"filter '{tok}': expected key=value, e.g. method=denoise or privacy.epsilon=3")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def select(records: list[RunRecord], filters: list[tuple[str, Any]]) -> list[RunRecord]:
    for key, _ in filters:
        if records and not any(r.value(key)[0] for r in records):
            raise DpftError(f"no run has a config key '{key}' (filter on a group choice such as method=denoise, "
                            "or a dotted key such as privacy.epsilon=3)")
    out = []
    for r in records:
        ok = True
        for key, want in filters:
            found, have = r.value(key)
            if not found or not _same(have, want):
                ok = False
                break
        if ok:
            out.append(r)
    return out


def age(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    s = int(seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def fmt_eps(v: Any) -> str:
    if v is None:
        return "—"
    if v == "inf" or v == float("inf"):
        return "∞"
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def config_diff(a: RunRecord, b: RunRecord) -> list[tuple[str, Any, Any]]:
    ca, cb = a.config, b.config
    missing = object()
    rows = []
    for key in sorted(set(ca) | set(cb)):
        va, vb = ca.get(key, missing), cb.get(key, missing)
        if va is missing or vb is missing or not _same(va, vb):
            rows.append((key, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return rows


def metric_rows(a: RunRecord, b: RunRecord) -> list[tuple[str, str, str]]:
    def priv(r: RunRecord, key: str):
        return (r.summary.get("privacy") or {}).get(key)

    def num(v, f=".4f"):
        if v is None:
            return "—"
        return format(v, f) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    rows = [("slug", a.slug, b.slug), ("status", a.status, b.status),
            ("steps", f"{a.step}/{a.steps or '?'}", f"{b.step}/{b.steps or '?'}")]
    metrics = [m for m in dict.fromkeys([a.metric, b.metric]) if m]
    for m in metrics:
        rows.append((f"final {m}", num(a.summary.get("final") if a.metric == m else None),
                     num(b.summary.get("final") if b.metric == m else None)))
        rows.append((f"best {m}", num(a.summary.get("best") if a.metric == m else None),
                     num(b.summary.get("best") if b.metric == m else None)))
    rows += [("ε spent", fmt_eps(a.epsilon), fmt_eps(b.epsilon)),
             ("δ", num(priv(a, "delta"), ".3g"), num(priv(b, "delta"), ".3g")),
             ("σ", num(priv(a, "sigma")), num(priv(b, "sigma"))),
             ("steps to 90% of target", num(a.summary.get("steps_to_90"), "d"), num(b.summary.get("steps_to_90"), "d")),
             ("wall time (s)", num(a.summary.get("wall_time_s"), ".1f"), num(b.summary.get("wall_time_s"), ".1f"))]
    return rows
