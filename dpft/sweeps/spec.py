"""Sweep files: find, read and check ``<name>.yaml`` (the files beside this module).

A sweep file (``dpft/sweeps/<name>.yaml``, format documented in ``dpft/sweeps/kappa.yaml``) is a
list of fixed Hydra overrides, a grid of axes in Hydra's sweep grammar and a ``report`` block. It
is deliberately *not* composed into the run config: every job is just an override list, so a job
is exactly ``dpft train <overrides>`` and has the same run id as that command, and the report
block can never leak into (and change) the hashed config. ``dpft.sweeps.plan`` turns a file into
jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpft.errors import DpftError


PACKAGE_SWEEPS = Path(__file__).resolve().parent  # the YAML files live beside the code

SWEEP_KEYS = ("overrides", "grid", "report")


@dataclass
class SweepFile:
    name: str
    path: Path
    overrides: list[str]
    grid: list[dict[str, str]]  # blocks: the plan is the union of each block's Cartesian product
    report: dict
    text: str


def _search_dirs() -> list[Path]:
    # ./sweeps first so a project can add (or shadow) tables without touching the package; in this
    # repository ./sweeps is a symlink to the packaged folder, so both resolve to the same files.
    dirs = [Path.cwd() / "sweeps", PACKAGE_SWEEPS]
    extra = os.environ.get("DPFT_SWEEPS_PATH")
    if extra:
        dirs = [Path(p) for p in extra.split(os.pathsep) if p] + dirs
    return dirs


def list_sweeps() -> dict[str, Path]:
    """name → file, first match wins along the search path."""
    found: dict[str, Path] = {}
    for d in _search_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def find_sweep(name: str) -> Path:
    p = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        if p.is_file():
            return p.resolve()
        if os.sep in name:
            raise DpftError(f"sweep file {name} not found")
        name = p.stem  # `dpft sweep kappa.yaml` from anywhere means the sweep named kappa
    sweeps = list_sweeps()
    if name in sweeps:
        return sweeps[name]
    available = ", ".join(sweeps) or "(none)"
    raise DpftError(f"unknown sweep '{name}'; available sweeps: {available} (or pass a path to a .yaml file)")


def _grid_value(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        raise DpftError(
            f"grid.{key}: write the axis in Hydra's sweep grammar (e.g. `{key}: 3,8` or `range(0,3)`); "
            "a YAML list or mapping is ambiguous with a list value"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        # `grid: {seed: 0,1}` is YAML for {seed: 0, 1: null}: flow mappings split at commas
        raise DpftError(f"grid.{key} has no value; in a {{flow: mapping}} YAML splits `a: 1,2` at the comma: "
                        "write the grid in block style (one `key: 1,2` per line) or quote the value")
    return str(value)


def parse_sweep_text(text: str, name: str, path: Path) -> SweepFile:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DpftError(f"sweep {name}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise DpftError(f"sweep {name}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise DpftError(f"sweep {name}: unknown top-level key(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(SWEEP_KEYS)}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, (str, int, float, bool)) for o in overrides):
        raise DpftError(f"sweep {name}: 'overrides' must be a list of Hydra overrides (key=value strings)")
    grid = data.get("grid") or {}
    # one mapping, or a list of mappings (blocks) for tables whose rows need different keys, e.g.
    # a DP-SGD baseline beside a method's own hyper-parameter axes
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or not all(isinstance(b, dict) for b in blocks):
        raise DpftError(f"sweep {name}: 'grid' must map override keys to sweeps, e.g. `seed: range(0,3)`, "
                        "or be a list of such mappings (blocks)")
    report = data.get("report") or {}
    if not isinstance(report, dict):
        raise DpftError(f"sweep {name}: 'report' must be a mapping")
    return SweepFile(name=name, path=path, overrides=[str(o) for o in overrides],
                     grid=[{str(k): _grid_value(str(k), v) for k, v in b.items()} for b in blocks],
                     report=report, text=text)


def _read_sweep_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DpftError(f"sweep file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_sweep_file(path: Path, name: str) -> SweepFile:
    return parse_sweep_text(_read_sweep_text(path), name, path)


def load_sweep(name: str) -> SweepFile:
    path = find_sweep(name)
    return read_sweep_file(path, path.stem)
