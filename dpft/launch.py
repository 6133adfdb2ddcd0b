"""Run a sweep plan: one process per job through an executor, a live table of job states.

Executors
- ``inline``: jobs run one after another inside this process (tests, debugging with pdb).
- ``local``: ``--workers N`` subprocesses ``python -m dpft.launch`` on this machine; with GPUs each
  worker slot owns one (``CUDA_VISIBLE_DEVICES`` pinned), so jobs never share a device or an
  allocator. A job dies with the sweep (PR_SET_PDEATHSIG) and records ``interrupted``.
- ``slurm`` / ``submitit-local``: submitit (``AutoExecutor``); on Slurm the whole plan goes out as
  one job array throttled to ``--workers``; the local flavour runs the same path without a cluster.

Resumability comes from the store, not from this module's memory: a job is identified by its
run id, ``done`` runs are skipped, ``interrupted``/dead ``running`` runs are simply run again,
``failed`` runs only with ``--retry-failed`` and everything with ``--force``. A run that another
live process is working on is waited for rather than started twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpft.errors import DpftError
from dpft.sweep import Job, Plan, job_state

log = logging.getLogger("dpft")

EXECUTORS = ("local", "inline", "slurm", "submitit-local")
POLL_S = 0.5


# --------------------------------------------------------------------------- one job


def run_job(overrides: list[str], run_id: str | None = None, force: bool = False) -> tuple[int, str]:
    """Compose, check the id against the plan, train. Returns (exit code, one-line error): 0 done,
    1 crashed, 2 bad input or stale plan, 130 interrupted; never raises for a job's own failure."""
    import traceback

    from dpft.config import compose_run
    from dpft.run import AlreadyDone, train_spec

    try:
        spec = compose_run(overrides)
    except DpftError as e:
        return _failed(2, str(e))
    if run_id and spec.run_id != run_id:
        # The config tree changed since the plan was written; running anyway would file the
        # result under an id the plan (and the report) does not know.
        return _failed(2, f"config for {' '.join(overrides)} now has run id {spec.run_id}, the plan says {run_id}; "
                          "configs changed since planning: re-run `dpft sweep` to re-plan")
    try:
        # re-entering a job continues its checkpoint; a job another process owns is waited for
        train_spec(spec, force=force, wait=True)
    except AlreadyDone:  # finished by a concurrent sweep in the meantime
        return 0, ""
    except KeyboardInterrupt:
        return 130, "interrupted"
    except DpftError as e:
        return _failed(2, str(e))
    except Exception as e:
        traceback.print_exc()
        return 1, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return 0, ""


def _failed(code: int, message: str) -> tuple[int, str]:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code, message


def job_command(job: Job, force: bool) -> list[str]:
    return [sys.executable, "-m", "dpft.launch", "--run-id", job.run_id, *(["--force"] if force else []),
            "--", *job.overrides]


def main(argv: list[str] | None = None) -> int:
    """Entry of one job process: ``python -m dpft.launch --run-id ID [--force] -- OVERRIDES``."""
    import argparse

    from dpft.cli import _setup_logging

    parser = argparse.ArgumentParser(prog="python -m dpft.launch", description="run one planned sweep job")
    parser.add_argument("--run-id", default=None, help="expected run id (from the plan)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    _setup_logging()
    # Slurm (preemption, time limit), the sweep (Ctrl-C, parent death) and `kill` all send SIGTERM:
    # turn it into the interrupt path so the run records `interrupted` instead of a dead `running`.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return run_job(args.overrides, args.run_id, args.force)[0]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _submitit_entry(overrides: list[str], run_id: str, force: bool, env: dict[str, str]) -> int:
    """What a submitit job runs (pickled by reference, so dpft must be importable there)."""
    from dpft.cli import _setup_logging

    os.environ.update(env)
    _setup_logging()
    return run_job(overrides, run_id, force)[0]


# --------------------------------------------------------------------------- executors


def visible_gpus() -> list[str]:
    """GPU ids to hand out: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists (no torch
    import: that costs seconds and would initialise CUDA in the parent)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass(eq=False)  # identity: the scheduler finds tasks in lists by object
class Task:
    job: Job
    state: str
    note: str = ""
    started: float | None = None
    ended: float | None = None
    rc: int | None = None
    log: Path | None = None
    handle: Any = None
    slot: int | None = None
    result: str = ""


class InlineExecutor:
    """Jobs inside the sweep process, one at a time: no isolation, for tests and debugging."""

    name = "inline"

    def __init__(self, plan: Plan, force: bool):
        self.plan, self.force = plan, force

    def capacity(self, running: int) -> int:
        return 1 - running

    def start(self, tasks: list[Task]) -> None:
        for t in tasks:
            saved = os.environ.get("WANDB_RUN_GROUP")
            os.environ.setdefault("WANDB_RUN_GROUP", self.plan.name)
            try:
                t.handle = run_job(t.job.overrides, t.job.run_id, self.force)
            finally:
                if saved is None:
                    os.environ.pop("WANDB_RUN_GROUP", None)
            if t.handle[0] == 130:  # Ctrl-C / SIGTERM landed inside the job: stop the sweep, not just the job
                raise KeyboardInterrupt

    def poll(self, t: Task) -> tuple[int, str] | None:
        return t.handle

    def cancel(self, tasks: list[Task]) -> None:
        pass


class LocalExecutor:
    """N worker slots of `python -m dpft.launch` subprocesses; slot i owns GPU i (if any)."""

    name = "local"

    def __init__(self, plan: Plan, force: bool, workers: int | None = None):
        self.plan, self.force = plan, force
        self.gpus = visible_gpus()
        self.workers = workers or max(1, len(self.gpus))
        if self.workers < 1:
            raise DpftError("--workers must be >= 1")
        self.free = list(range(self.workers))
        self.sweep = plan.sweep_dir

    def describe(self) -> str:
        gpu = f", GPUs {','.join(self.gpus)} (one per worker)" if self.gpus else ", CPU"
        return f"local executor, {self.workers} worker(s){gpu}; logs in {self.sweep.logs}"

    def capacity(self, running: int) -> int:
        return len(self.free)

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("WANDB_RUN_GROUP", self.plan.name)
        env["PYTHONUNBUFFERED"] = "1"
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        elif "OMP_NUM_THREADS" not in env:
            # N CPU jobs each defaulting to all cores would oversubscribe the machine N-fold
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        return env

    def start(self, tasks: list[Task]) -> None:
        self.sweep.logs.mkdir(parents=True, exist_ok=True)
        for t in tasks:
            t.slot = self.free.pop(0)
            t.log = self.sweep.log(t.job.run_id)
            with open(t.log, "a", encoding="utf-8") as f:
                f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job_command(t.job, self.force))}\n")
                f.flush()
                t.handle = subprocess.Popen(job_command(t.job, self.force), stdout=f, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self._env(t.slot),
                                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def poll(self, t: Task) -> tuple[int, str] | None:
        rc = t.handle.poll()
        if rc is None:
            return None
        self.free.append(t.slot)
        self.free.sort()
        return (130 if rc in (-signal.SIGINT, -signal.SIGTERM) else rc), ""

    def cancel(self, tasks: list[Task]) -> None:
        procs = [t.handle for t in tasks if t.handle is not None and t.handle.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)  # the job turns it into `interrupted`
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class SubmititExecutor:
    """submitit's AutoExecutor: `slurm` submits one job array, `submitit-local` runs the same
    pickled entry point as local processes (what the tests exercise)."""

    def __init__(self, plan: Plan, force: bool, cluster: str, workers: int | None = None,
                 params: dict[str, Any] | None = None):
        try:
            import submitit
        except ImportError:
            raise DpftError("the slurm executors need submitit: pip install 'dpft[slurm]'") from None
        self.plan, self.force, self.cluster = plan, force, cluster
        self.name = "slurm" if cluster == "slurm" else "submitit-local"
        self.folder = plan.sweep_dir.submitit
        self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=cluster)
        self.workers = workers
        defaults: dict[str, Any] = {"name": f"dpft-{plan.name}", "timeout_min": 24 * 60}
        if cluster == "slurm":
            defaults["gpus_per_node"] = 1  # DP fine-tuning is a GPU job; pass gpus_per_node=0 for CPU
            if workers:
                defaults["slurm_array_parallelism"] = workers
        defaults.update(params or {})
        try:
            self.executor.update_parameters(**defaults)
        except (ValueError, TypeError) as e:
            raise DpftError(f"submitit parameters: {' '.join(str(e).split())[:300]}") from None

    def describe(self) -> str:
        return f"{self.name} executor (submitit), folder {self.folder}"

    def capacity(self, running: int) -> int:
        if self.cluster == "slurm":
            return 1 << 30  # the array's parallelism limit throttles on the cluster side
        return (self.workers or 1) - running

    def start(self, tasks: list[Task]) -> None:
        env = {"WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", self.plan.name)}
        with self.executor.batch():
            pending = [(t, self.executor.submit(_submitit_entry, t.job.overrides, t.job.run_id, self.force, env))
                       for t in tasks]
        for t, job in pending:
            t.handle = job
            t.log = Path(str(job.paths.stdout))

    def poll(self, t: Task) -> tuple[int, str] | None:
        job = t.handle
        if not job.done():
            return None
        try:
            return int(job.result()), ""
        except Exception as e:  # timeout, node failure, OOM kill: submitit raises on result()
            return 1, " ".join(str(e).split())[-300:]

    def cancel(self, tasks: list[Task]) -> None:
        for t in tasks:
            if t.handle is not None:
                try:
                    t.handle.cancel(check=False)
                except Exception as e:  # pragma: no cover - cluster trouble while stopping
                    log.warning("could not cancel %s: %s", t.job.run_id, e)


def make_executor(name: str, plan: Plan, force: bool, workers: int | None, params: dict[str, Any] | None = None):
    if name == "inline":
        return InlineExecutor(plan, force)
    if name == "local":
        return LocalExecutor(plan, force, workers)
    if name in ("slurm", "submitit-local"):
        return SubmititExecutor(plan, force, "slurm" if name == "slurm" else "local", workers, params)
    raise DpftError(f"unknown executor '{name}'; choose one of {', '.join(EXECUTORS)}")


# --------------------------------------------------------------------------- the scheduler


STYLE = {"done": "green", "skipped": "green", "running": "yellow", "waiting": "yellow", "pending": "dim",
         "failed": "bold red", "interrupted": "magenta", "cancelled": "magenta"}


def initial_tasks(plan: Plan, force: bool, retry_failed: bool) -> list[Task]:
    tasks = []
    for job in plan.jobs:
        st = job_state(plan.output_dir, job.run_id)
        if st == "running":
            tasks.append(Task(job, "waiting", "another process is running it"))
        elif st == "done" and not force:
            tasks.append(Task(job, "skipped", "finished earlier"))
        elif st == "failed" and not (retry_failed or force):
            tasks.append(Task(job, "failed", "failed earlier (use --retry-failed)"))
        else:  # missing, interrupted, stale (killed without cleanup), or forced
            tasks.append(Task(job, "pending", {"interrupted": "resuming after interrupt",
                                                "stale": "previous attempt died"}.get(st, "")))
    return tasks


def counts(tasks: list[Task]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tasks:
        out[t.state] = out.get(t.state, 0) + 1
    return out


def _result(plan: Plan, job: Job) -> str:
    from dpft import store

    s = store.Store(plan.output_dir).run(job.run_id).summary() or {}
    if s.get("final") is None:
        return ""
    return f"{s.get('metric', 'metric')} {s['final']:.4f}"


def _error_of(plan: Plan, t: Task) -> str:
    from dpft import store

    meta = store.Store(plan.output_dir).run(t.job.run_id).meta() or {}
    if meta.get("error"):
        return str(meta["error"])
    if t.log and Path(t.log).is_file():
        lines = [ln for ln in Path(t.log).read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
        return (errs[-1] if errs else (lines[-1] if lines else "")).strip()[:300]
    return ""


def _fmt_s(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Display:
    """A rich Live table on a terminal; one line per state change otherwise (logs, CI, tests)."""

    def __init__(self, plan: Plan, tasks: list[Task], console):
        self.plan, self.tasks, self.console = plan, tasks, console
        self.live = None

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def event(self, t: Task) -> None:
        if self.live is not None:
            return
        n = len(self.tasks)
        i = self.tasks.index(t) + 1
        took = f" {t.ended - t.started:.0f}s" if t.started and t.ended else ""
        extra = f"  {t.note}" if t.note else ""
        eta = self.eta()
        eta = f"  (sweep eta {_fmt_s(eta)})" if eta is not None and t.state in ("done", "failed", "interrupted") \
            and any(x.state in ("pending", "running") for x in self.tasks) else ""
        self.console.print(f"[{i}/{n}] {t.state:<11} {t.job.run_id}  {t.job.describe()}{took}{extra}{eta}",
                           highlight=False, markup=False)

    def job_progress(self, t: Task) -> tuple[int, int | None]:
        """(last logged step, planned steps) of a job from its run directory."""
        from dpft import store

        run = store.Store(self.plan.output_dir).run(t.job.run_id)
        meta = run.meta() or {}
        steps = meta.get("steps") if meta.get("run_id") == t.job.run_id else None
        return run.last_step(), steps if isinstance(steps, int) else None

    def eta(self) -> float | None:
        """Seconds until the sweep is done: each running job's remaining steps at its own pace, plus
        the pending jobs at the mean duration of the jobs finished in this sweep (or, before any
        has, the running jobs' projected durations), spread over the jobs that run at once."""
        now = time.time()
        finished = [t.ended - t.started for t in self.tasks if t.state == "done" and t.started and t.ended]
        running = [t for t in self.tasks if t.state == "running" and t.started]
        remaining, projected = [], []
        for t in running:
            step, steps = self.job_progress(t)
            elapsed = now - t.started
            if steps and step > 0:
                # steps resumed from a checkpoint count as done at no cost: a slight underestimate
                per = elapsed / step
                remaining.append(per * max(0, steps - step))
                projected.append(per * steps)
            else:
                remaining.append(None)
        pending = sum(t.state == "pending" for t in self.tasks)
        if finished:
            per_job = sum(finished) / len(finished)
        else:
            per_job = sum(projected) / len(projected) if projected else None
        if per_job is None or any(r is None for r in remaining) and not finished:
            return None
        rem = [r if r is not None else per_job for r in remaining]
        width = max(1, len(running))
        return (sum(rem) + pending * per_job) / width

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self):
        from rich.table import Table

        from rich.markup import escape

        c = counts(self.tasks)
        summary = "  ".join(f"{k} {v}" for k, v in sorted(c.items()))
        eta = self.eta()
        eta = f"  eta {_fmt_s(eta)}" if eta is not None else ""
        table = Table(title=escape(f"sweep {self.plan.name}: {len(self.tasks)} jobs  ({summary}){eta}"),
                      title_justify="left")
        for col in ("state", "run id", "job", "step", "time", "result / note"):
            table.add_column(col, no_wrap=col != "result / note", justify="right" if col == "step" else "left")
        order = {"running": 0, "failed": 1, "waiting": 2, "interrupted": 3, "pending": 4, "done": 5, "skipped": 6}
        rows = sorted(self.tasks, key=lambda t: (order.get(t.state, 9), self.tasks.index(t)))
        limit = max(5, (self.console.size.height or 40) - 8)
        now = time.time()
        for t in rows[:limit]:
            took = ""
            if t.started:
                took = f"{(t.ended or now) - t.started:.0f}s"
            if t.state in ("done", "skipped") and not t.result:
                t.result = _result(self.plan, t.job)
            res = t.result if t.state in ("done", "skipped") else t.note
            prog = ""
            if t.state == "running":
                step, steps = self.job_progress(t)
                prog = f"{step}/{steps}" if steps else (str(step) if step else "")
            table.add_row(f"[{STYLE.get(t.state, '')}]{t.state}", t.job.run_id, escape(t.job.describe()), prog, took,
                          escape(res))
        if len(rows) > limit:
            table.add_row("…", "", f"{len(rows) - limit} more", "", "", "")
        return table


@dataclass
class SweepResult:
    tasks: list[Task]
    interrupted: bool = False
    failed: list[Task] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


def run_plan(plan: Plan, executor, *, force: bool = False, retry_failed: bool = False, fail_fast: bool = False,
             console=None) -> SweepResult:
    from rich.console import Console

    console = console or Console()
    tasks = initial_tasks(plan, force, retry_failed)
    running: list[Task] = []
    interrupted = stop = False

    def finish(t: Task, rc: int, note: str) -> None:
        t.ended, t.rc = time.time(), rc
        st = job_state(plan.output_dir, t.job.run_id)
        if st == "done" and rc == 0:
            t.state, t.note = "done", ""
        elif rc == 130 or st == "interrupted":
            t.state, t.note = "interrupted", note
        else:
            t.state = "failed"
            t.note = note or _error_of(plan, t) or f"exit code {rc}"
            if t.log:
                t.note += f"  (log: {t.log})"

    # SIGTERM (kill, Slurm, CI timeouts) must stop the jobs too, exactly like Ctrl-C does.
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (e.g. called from a worker thread): keep the default
        pass
    try:
        with Display(plan, tasks, console) as display:
            for t in tasks:
                if t.state != "pending":
                    display.event(t)
            while True:
                for t in list(running):
                    res = executor.poll(t)
                    if res is not None:
                        running.remove(t)
                        finish(t, *res)
                        display.event(t)
                        if t.state == "failed" and fail_fast:
                            stop = True
                for t in tasks:
                    if t.state == "waiting":
                        st = job_state(plan.output_dir, t.job.run_id)
                        if st != "running":
                            if st == "done":
                                t.state, t.note = "done", "finished by another process"
                            elif st == "failed" and not retry_failed:
                                t.state, t.note = "failed", "failed in another process"
                            else:
                                t.state, t.note = "pending", ""
                            display.event(t)
                pending = [t for t in tasks if t.state == "pending"]
                if stop:
                    break
                room = executor.capacity(len(running))
                if pending and room > 0:
                    batch = pending[:room]
                    for t in batch:
                        t.state, t.started, t.note = "running", time.time(), ""
                        display.event(t)
                    running.extend(batch)
                    display.refresh()
                    executor.start(batch)
                    continue  # inline jobs are already finished: collect them at once
                if not running and not any(t.state == "waiting" for t in tasks):
                    break
                display.refresh()
                time.sleep(POLL_S)
            if stop and running:
                executor.cancel(running)
                for t in running:
                    t.state, t.note, t.ended = "cancelled", "stopped by --fail-fast", time.time()
                running.clear()
            if stop:
                for t in tasks:
                    if t.state == "pending":
                        t.state, t.note = "cancelled", "not started (--fail-fast)"
    except KeyboardInterrupt:
        interrupted = True
        executor.cancel(running)
        for t in running:
            t.state, t.note, t.ended = "interrupted", "sweep interrupted", time.time()
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return SweepResult(tasks, interrupted, [t for t in tasks if t.state == "failed"])


if __name__ == "__main__":
    sys.exit(main())
