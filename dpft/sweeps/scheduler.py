"""Run a sweep plan: start each job through an executor, follow their states, show them live.

Resumability comes from the store, not from this module's memory: a job is identified by its
run id, ``done`` runs are skipped, ``interrupted``/dead ``running`` runs are simply run again,
``failed`` runs only with ``--retry-failed`` and everything with ``--force``. A run that another
live process is working on is waited for rather than started twice.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpft.sweeps.display import Display
from dpft.sweeps.executors import Task
from dpft.sweeps.job import raise_interrupt
from dpft.sweeps.plan import Plan, job_state

POLL_S = 0.5


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
        old_term = signal.signal(signal.SIGTERM, raise_interrupt)
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
