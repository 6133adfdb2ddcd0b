"""Labels: how a job's config value is written in a report (row/column keys, selectors).

A key is a dotted config key (``privacy.epsilon``), a config group (``method``) or a group's name;
a job without the key (a method's own knob on a baseline row) has the label ``MISSING``.
"""

from __future__ import annotations

from typing import Any

from dpft.sweeps.plan import Job


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
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
    flat = flat if flat is not None else flat_config(job.config)
    if key in flat:
        return fmt_label(flat[key])
    if key in job.choices:
        return fmt_label(job.choices[key])
    node = job.config.get(key)
    if isinstance(node, dict) and "name" in node:
        return fmt_label(node["name"])
    return MISSING  # e.g. a method's own knob on a baseline row (a grid block without it)


MISSING = "—"


def same_label(value: Any, label: str) -> bool:
    """A paper entry's `privacy.epsilon: 3.0` matches the label of a config value 3."""
    if fmt_label(value) == label:
        return True
    try:
        return not isinstance(value, bool) and float(value) == float(label)
    except (TypeError, ValueError):
        return False


def ordered_unique(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
