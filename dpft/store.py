"""The run store: ``outputs/runs/<run_id>/`` with config.yaml, overrides.yaml, meta.json,
metrics.jsonl (appended and flushed per record) and summary.json (atomic, written last).

A run is *done* when meta.json says ``status: done`` and summary.json exists.

One owner per run directory: ``RunLock`` holds an exclusive ``flock`` on ``runs/<run_id>.lock``
(beside the directory, so archiving an attempt never moves it) for as long as a process trains
into ``runs/<run_id>/``. The kernel drops the lock when its holder dies, however it dies, so a
stale lock (SIGKILL, a crashed local process) is simply taken by the next process; the file's
text (pid, host, time) only names the owner in the refusal message.

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


# --------------------------------------------------------------------------- browsing the store


def list_runs(output_dir: str | os.PathLike) -> list[Path]:
    root = runs_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file())


def find_run(output_dir: str | os.PathLike, ref: str) -> Path:
    """A run directory from its id or a unique prefix of it."""
    from dpft.errors import DpftError

    runs = list_runs(output_dir)
    hits = [p for p in runs if p.name == ref] or [p for p in runs if ref and p.name.startswith(ref)]
    if not hits:
        raise DpftError(f"no run '{ref}' in {runs_root(output_dir)} (see `dpft runs`)")
    if len(hits) > 1:
        raise DpftError(f"run prefix '{ref}' is ambiguous: {', '.join(p.name for p in hits[:6])}"
                        + (" …" if len(hits) > 6 else ""))
    return hits[0]


def tail_record(metrics_path: Path, key: str | None = None, window: int = 262144) -> dict | None:
    """The last complete record of a metrics.jsonl (with `key`, if given), read from its tail (cheap;
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


def last_step(metrics_path: Path) -> int:
    """The step of the last complete record of a metrics.jsonl (0 if none)."""
    rec = tail_record(metrics_path, window=65536)
    return int(rec["step"]) if rec else 0
