"""What a running sweep shows: a rich Live table of job states on a terminal, one line per state
change otherwise (logs, CI, tests), with each running job's step and the sweep's ETA read from the
run directories."""

from __future__ import annotations

import time

from dpft.sweeps.executors import Task
from dpft.sweeps.plan import Job, Plan


STYLE = {"done": "green", "skipped": "green", "running": "yellow", "waiting": "yellow", "pending": "dim",
         "failed": "bold red", "interrupted": "magenta", "cancelled": "magenta"}


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
