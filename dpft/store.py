"""The store: every file dpft keeps under ``paths.output_dir``, and the only module that names them.

    <output_dir>/
      runs/<run_id>/        RunDir    config.yaml overrides.yaml meta.json metrics.jsonl summary.json
                                      checkpoint.pt generations_<split>.jsonl wandb/ attempts/<k>/
      runs/<run_id>.lock              the owner's lock (beside the directory: archiving never moves it)
      sweeps/<name>/        SweepDir  plan.jsonl sweep.yaml sweep.json logs/<run_id>.log submitit/
      audits/<id>/          AuditDir  a RunDir's files + canaries.jsonl audit.json
      reports/<name>/       ReportDir the rendered tables and plots

``Store(output_dir)`` hands out these directory objects; everything else in dpft asks them for a
path or a record instead of spelling a file name (tests/test_layout.py checks that).

A run: metrics.jsonl is appended and flushed per record, summary.json is written atomically after
the last step, and the run is *done* when meta.json says ``status: done`` and summary.json exists.

One owner per run directory: ``RunLock`` holds an exclusive ``flock`` on ``runs/<run_id>.lock``
for as long as a process trains into ``runs/<run_id>/``. The kernel drops the lock when its holder
dies, however it dies, so a stale lock (SIGKILL, a crashed local process) is simply taken by the
next process; the file's text (pid, host, time) only names the owner in the refusal message.

File permissions: every run file dpft writes (config.yaml, overrides.yaml, meta.json,
metrics.jsonl, summary.json, the lock) is created ``0666 & ~umask`` — 0644 under the usual umask
022, like any file you create; they hold configs and aggregate metrics that are released anyway
(the threat model's adversary reads the config and the logs). The one exception is
``checkpoint.pt`` (trained weights and optimizer state), which the engine writes owner-only (0600).
Set a stricter umask (e.g. 077) to make every run file private."""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from dpft.tracking import MetricSink

STATUSES = ("running", "done", "failed", "interrupted")


def jsonable(obj: Any) -> Any:
    """`obj` as JSON can hold it: NaN → null, ±inf → "inf"/"-inf", numpy/torch scalars → numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item"):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def file_mode() -> int:
    """The mode of a newly created run file: 0666 & ~umask (see the module docstring)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600; run files follow the umask (module docstring)
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
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


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
    """`RunDir(path).status()`."""
    return RunDir(path).status()


# --------------------------------------------------------------------------- one owner per run


class RunLocked(Exception):
    """Another live process owns the run directory."""

    def __init__(self, path: Path, owner: dict | None):
        self.path, self.owner = Path(path), owner or {}
        super().__init__(f"{path} is locked by {describe_owner(self.owner)}")


def lock_path(run_path: Path) -> Path:
    run_path = Path(run_path)
    return run_path.parent / f"{run_path.name}.lock"


def describe_owner(owner: dict | None) -> str:
    if not owner or "pid" not in owner:
        return "another process (it has not written its name yet)"
    since = f", since {owner['since']}" if owner.get("since") else ""
    return f"pid {owner['pid']} on host {owner.get('host', '?')}{since}"


def _read_owner(path: Path) -> dict | None:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class RunLock:
    """Exclusive ownership of one run directory (``runs/<id>``) through ``flock`` on
    ``runs/<id>.lock``. ``acquire(wait=False)`` raises ``RunLocked`` naming the owner; with
    ``wait=True`` it blocks until the owner lets go (``on_wait(owner)`` is called once first).

    Races: the lock itself is the kernel's (atomic, dropped when its holder dies). The file is
    unlinked on release while still held, and an acquirer that locked a file that was unlinked in
    the meantime (its inode is no longer at the path) drops it and tries again, so two processes
    never both hold "the" lock. On NFS, Linux maps flock to POSIX locks served by the NFS lock
    manager, so hosts sharing a store exclude each other too."""

    def __init__(self, run_path: Path):
        self.run_path = Path(run_path)
        self.path = lock_path(self.run_path)
        self._fd: int | None = None

    def acquire(self, wait: bool = False, on_wait=None) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_owner(self.path)
                    if not wait:
                        raise RunLocked(self.run_path, owner) from None
                    if not told and on_wait is not None:
                        on_wait(owner)
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the owner lets go; Ctrl-C interrupts
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous owner unlinked this file after we opened it: retry
                    os.close(fd)
                    continue
                owner = {"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
                self._fd = fd
                return self
            except BaseException:
                if self._fd != fd:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_owner(run_path: Path) -> dict | None:
    """The live owner of a run directory ({pid, host, since}), or None if nobody holds it."""
    import fcntl

    path = lock_path(run_path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_owner(path) or {}
    finally:
        os.close(fd)
    return None


# --------------------------------------------------------------------------- the layout


class Store:
    """The directories under one ``paths.output_dir`` (module docstring)."""

    RUNS, SWEEPS, AUDITS, REPORTS = "runs", "sweeps", "audits", "reports"

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir)

    @property
    def runs_root(self) -> Path:
        return self.root / self.RUNS

    def run(self, run_id: str) -> "RunDir":
        return RunDir(self.runs_root / run_id)

    def runs(self) -> list["RunDir"]:
        """Every run directory that has begun (has a meta.json), sorted by id."""
        if not self.runs_root.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.runs_root.iterdir()) if p.is_dir() and RunDir(p).meta_path.is_file()]

    def find_run(self, ref: str) -> "RunDir":
        """A run directory from its id or a unique prefix of it."""
        from dpft.errors import DpftError

        runs = self.runs()
        hits = [r for r in runs if r.run_id == ref] or [r for r in runs if ref and r.run_id.startswith(ref)]
        if not hits:
            raise DpftError(f"no run '{ref}' in {self.runs_root} (see `dpft runs`)")
        if len(hits) > 1:
            raise DpftError(f"run prefix '{ref}' is ambiguous: {', '.join(r.run_id for r in hits[:6])}"
                            + (" …" if len(hits) > 6 else ""))
        return hits[0]

    def sweep(self, name: str) -> "SweepDir":
        return SweepDir(self.root / self.SWEEPS / name)

    def audit(self, audit_id: str) -> "AuditDir":
        return AuditDir(self.root / self.AUDITS / audit_id)

    def report(self, name: str) -> "ReportDir":
        return ReportDir(self.root / self.REPORTS / name)


def run_dir(output_dir: str | os.PathLike, run_id: str) -> Path:
    """The path of run `run_id` (for scripts and tests that read a run's files directly)."""
    return Store(output_dir).run(run_id).path


class _Dir:
    """A directory of the store, named by its path; subclasses say which files it holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class RunDir(_Dir):
    """One run directory and its lifecycle: ``begin`` (archive the previous attempt, write the
    config), ``write_meta`` (status running), the metrics (a sink while training; truncated on a
    resume), ``write_summary``, ``finish`` (final status). Readers: ``status``, ``meta``,
    ``summary``, ``config``, ``metrics``, ``tail_record``, ``alive``."""

    CONFIG, OVERRIDES, META = "config.yaml", "overrides.yaml", "meta.json"
    METRICS, SUMMARY, CHECKPOINT = "metrics.jsonl", "summary.json", "checkpoint.pt"
    ATTEMPTS = "attempts"
    # A run on another host cannot be probed by pid; metrics.jsonl is appended every logged step, so
    # a run whose files have not changed for this long is taken to be dead (killed without cleanup).
    STALE_AFTER_S = 15 * 60

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def meta_path(self) -> Path:
        return self.path / self.META

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint(self) -> Path:
        """Where the engine keeps its checkpoint (dpft/engine/checkpoint.py writes it 0600)."""
        return self.path / self.CHECKPOINT

    # ---------------------------------------------------------------- reading

    def status(self) -> str | None:
        """done | running | failed | interrupted | None (no run). 'done' needs a readable summary
        too; a status that is none of these (meta.json edited by hand) counts as failed."""
        meta = self.meta()
        if meta is None:
            return None
        status = meta.get("status")
        if status not in STATUSES:
            return "failed"
        if status == "done" and self.summary() is None:
            return "failed"
        return status

    def meta(self) -> dict | None:
        return read_json(self.meta_path)

    def summary(self) -> dict | None:
        return read_json(self.path / self.SUMMARY)

    def config(self) -> dict:
        """The resolved config as written at the start ({} if missing or unreadable)."""
        import yaml

        try:
            data = yaml.safe_load((self.path / self.CONFIG).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def tail_record(self, key: str | None = None, window: int = 262144) -> dict | None:
        """The last complete metrics record (with `key`, if given), read from the file's tail."""
        return tail_record(self.metrics_path, key, window)

    def last_step(self) -> int:
        """The step of the last complete metrics record (0 if none)."""
        rec = self.tail_record(window=65536)
        return int(rec["step"]) if rec else 0

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def age_s(self) -> float:
        """Seconds since meta.json last changed (nan without one)."""
        try:
            return time.time() - self.meta_path.stat().st_mtime
        except OSError:
            return float("nan")

    # ---------------------------------------------------------------- owner

    def lock(self) -> "RunLock":
        return RunLock(self.path)

    def owner(self) -> dict | None:
        """The live owner ({pid, host, since}), or None if no process holds the lock."""
        return lock_owner(self.path)

    def alive(self) -> bool:
        """Is a process still training into this directory?"""
        # the lock is exact: the kernel drops it whatever way its owner died
        if self.owner() is not None:
            return True
        if lock_path(self.path).exists():
            return False
        # runs from before the lock, or whose lock file was removed: the pid, else the staleness guess
        meta = self.meta() or {}
        pid, host = meta.get("pid"), meta.get("host")
        if host == socket.gethostname() and isinstance(pid, int):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                # a recycled pid belongs to some other program
                return b"dpft" in cmdline or b"submitit" in cmdline
            except OSError:
                try:
                    os.kill(pid, 0)
                    return True
                except OSError:
                    return False
        newest = max((p.stat().st_mtime for p in self.path.glob("*") if p.is_file()), default=0)
        return time.time() - newest < self.STALE_AFTER_S

    # ---------------------------------------------------------------- writing

    def archive_previous(self) -> Path | None:
        """A failed/interrupted attempt is kept under attempts/<k>/, never overwritten. Returns it."""
        path = self.path
        if not path.exists() or not any(p for p in path.iterdir() if p.name != self.ATTEMPTS):
            return None
        k = 1
        while (path / self.ATTEMPTS / str(k)).exists():
            k += 1
        dest = path / self.ATTEMPTS / str(k)
        dest.mkdir(parents=True)
        import shutil

        for item in list(path.iterdir()):
            if item.name != self.ATTEMPTS:
                shutil.move(str(item), dest / item.name)
        return dest

    def begin(self, config: str, overrides: list[str] | None = None) -> Path | None:
        """Start a fresh attempt: archive what is there (returned), then write the resolved config
        (YAML text) and, if given, the overrides."""
        archived = self.archive_previous()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        if overrides is not None:
            self.write_overrides(overrides)
        return archived

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / self.CONFIG, text)

    def write_overrides(self, overrides: list[str]) -> None:
        from omegaconf import OmegaConf

        atomic_write_text(self.path / self.OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))

    def write_meta(self, meta: dict) -> None:
        atomic_write_json(self.meta_path, meta)

    def finish(self, meta: dict, status: str) -> None:
        """The final status (done | failed | interrupted) and end time, into `meta` and meta.json."""
        meta.update(status=status, time_end=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.write_meta(meta)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / self.SUMMARY, summary)

    def remove_checkpoint(self) -> None:
        """After the summary: the summary and metrics are the record of a finished run."""
        self.checkpoint.unlink(missing_ok=True)

    def metrics_sink(self) -> "JsonlSink":
        return JsonlSink(self.metrics_path)

    def write_metrics(self, records: list[dict]) -> None:
        """Replace metrics.jsonl by `records`, atomically."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(jsonable(r), sort_keys=True) + "\n" for r in records))

    def logged_after(self, step: int) -> int:
        """How many steps after `step` have a metrics record (released, as far as the run can know:
        W&B logs the same records after they are written here)."""
        return len({int(r["step"]) for r in self.metrics() if int(r.get("step", 0)) > step})

    def truncate_metrics(self, step: int) -> None:
        """Keep the records of steps ≤ `step` (written before the checkpoint). A resume recomputes
        the later ones: identically under privacy.noise=seeded; with fresh noise otherwise, when the
        engine charges them to the accountant again (`logged_after`, dpft/engine/train.py)."""
        self.write_metrics([r for r in self.metrics() if int(r.get("step", 0)) <= step])

    def write_generations(self, split: str, lines: list[str]) -> None:
        """The latest decode of a split (one JSON line per table), for inspection and re-scoring."""
        atomic_write_text(self.path / f"generations_{split}.jsonl", "\n".join(lines) + "\n")


class AuditDir(RunDir):
    """An audit's directory: the audit run's files (as a RunDir) plus its canaries and result;
    audit.json is written last, so its presence means the audit finished."""

    RESULT, CANARIES = "audit.json", "canaries.jsonl"

    @property
    def result_path(self) -> Path:
        return self.path / self.RESULT

    def result(self) -> dict | None:
        return read_json(self.result_path)

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_path, result)

    def write_canaries(self, rows: list[dict]) -> None:
        atomic_write_text(self.path / self.CANARIES, "".join(json.dumps(r) + "\n" for r in rows))


class SweepDir(_Dir):
    """A sweep's plan (one resolved job per line), the frozen copy of its sweep file, its info
    record, the local executor's per-job logs and submitit's folder."""

    PLAN, FROZEN, INFO, LOGS, SUBMITIT = "plan.jsonl", "sweep.yaml", "sweep.json", "logs", "submitit"

    @property
    def plan_path(self) -> Path:
        return self.path / self.PLAN

    @property
    def frozen_sweep(self) -> Path:
        return self.path / self.FROZEN

    @property
    def logs(self) -> Path:
        return self.path / self.LOGS

    def log(self, run_id: str) -> Path:
        return self.logs / f"{run_id}.log"

    @property
    def submitit(self) -> Path:
        return self.path / self.SUBMITIT

    def write_plan(self, jobs: list[dict], sweep_text: str, info: dict) -> Path:
        lines = [json.dumps(jsonable(j), sort_keys=True) for j in jobs]
        atomic_write_text(self.plan_path, "\n".join(lines) + "\n")
        atomic_write_text(self.frozen_sweep, sweep_text)
        atomic_write_json(self.path / self.INFO, info)
        return self.plan_path

    def info(self) -> dict | None:
        return read_json(self.path / self.INFO)


class ReportDir(_Dir):
    """Where a report's tables and plots go (default ``reports/<name>``; ``--out`` names another)."""

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def write(self, name: str, text: str) -> Path:
        path = self.file(name)
        atomic_write_text(path, text)
        return path


# --------------------------------------------------------------------------- metrics


def tail_record(metrics_path: Path, key: str | None = None, window: int = 262144) -> dict | None:
    """The last complete record of a metrics file (with `key`, if given), read from its tail (cheap;
    the part after the last newline may be torn)."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - window))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[:-1]):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and (key is None or key in rec):
            return rec
    return None


class JsonlSink(MetricSink):
    """The run's metrics.jsonl as a metric sink: append-only, every record flushed and fsynced so a
    crash loses at most the line being written. Opened at the first record, so a resume's
    truncation (RunDir.truncate_metrics, which replaces the file) always comes before it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None

    def log(self, record: dict) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            self._f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # e.g. ENOSPC: name the file (read_metrics skips a torn last line)
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None

    def close(self, exit_code: int = 0) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()
