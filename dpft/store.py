"""The run store: ``outputs/runs/<run_id>/`` with config.yaml, overrides.yaml, meta.json,
metrics.jsonl (appended and flushed per record) and summary.json (atomic, written last).

A run is *done* when meta.json says ``status: done`` and summary.json exists."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

STATUSES = ("running", "done", "failed", "interrupted")


def runs_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "runs"


def run_dir(output_dir: str | os.PathLike, run_id: str) -> Path:
    return runs_root(output_dir) / run_id


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_status(path: Path) -> str | None:
    """done | running | failed | interrupted | None (no run). 'done' needs the summary too."""
    meta = read_json(Path(path) / "meta.json")
    if meta is None:
        return None
    status = meta.get("status")
    if status == "done" and not (Path(path) / "summary.json").is_file():
        return "failed"
    return status


class MetricsWriter:
    """Append-only JSONL; every record is flushed and fsynced so a crash loses at most the line
    being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
