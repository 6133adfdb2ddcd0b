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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # ENOSPC from write/fsync names no file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None if it is missing, unreadable or not an object (a store
    file edited by hand reads as absent, never as a half-understood record)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl. A torn last line (a crash mid-write: no newline after it) is
    ignored; any other line that is not a JSON object with an integer step (a hand edit, a
    corrupt disk) is refused with its file and line rather than silently dropped."""
    from dpft.errors import DpftError

    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        step = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            out.append(rec)
        elif i < len(lines):  # a complete line (newline-terminated) that is not a record
            raise DpftError(f"{path}:{i}: not a metrics record (a JSON object with an integer step); "
                            "the run directory was edited or is corrupt")
    return out


def run_status(path: Path) -> str | None:
    """done | running | failed | interrupted | None (no run). 'done' needs a readable summary too;
    a status that is none of these (meta.json edited by hand) counts as failed."""
    meta = read_json(Path(path) / "meta.json")
    if meta is None:
        return None
    status = meta.get("status")
    if status not in STATUSES:
        return "failed"
    if status == "done" and read_json(Path(path) / "summary.json") is None:
        return "failed"
    return status


class NullWriter:
    """Where data-parallel workers other than rank 0 write their metrics: nowhere."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter:
    """Append-only JSONL; every record is flushed and fsynced so a crash loses at most the line
    being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # e.g. ENOSPC: name the file (read_metrics skips a torn last line)
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
