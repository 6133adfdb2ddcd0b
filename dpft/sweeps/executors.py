"""Executors: how the jobs of a sweep plan run.

- ``inline``: jobs run one after another inside this process (tests, debugging with pdb).
- ``local``: ``--workers N`` subprocesses ``python -m dpft.sweeps.job`` on this machine; with GPUs
  each worker slot owns one (``CUDA_VISIBLE_DEVICES`` pinned), so jobs never share a device or an
  allocator. A job dies with the sweep (PR_SET_PDEATHSIG) and records ``interrupted``.
- ``slurm`` / ``submitit-local``: submitit (``AutoExecutor``); on Slurm the whole plan goes out as
  one job array throttled to ``--workers``; the local flavour runs the same path without a cluster.

Each executor starts a batch of ``Task``s, polls one for (exit code, note) and cancels the running
ones; the scheduler (``dpft.sweeps.scheduler``) decides what starts when.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpft.errors import DpftError
from dpft.sweeps.job import job_command, run_job, submitit_entry
from dpft.sweeps.plan import Job, Plan

log = logging.getLogger("dpft")


EXECUTORS = ("local", "inline", "slurm", "submitit-local")


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
    """One planned job in a running sweep: its state for the scheduler and the display, and what
    its executor needs to follow it (process or submitit handle, worker slot, log file)."""

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
    """N worker slots of `python -m dpft.sweeps.job` subprocesses; slot i owns GPU i (if any)."""

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
            pending = [(t, self.executor.submit(submitit_entry, t.job.overrides, t.job.run_id, self.force, env))
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
