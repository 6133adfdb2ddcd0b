"""Where a run's records go: the metric-sink interface, the fan-out, and the sinks besides the
run's own metrics file (dpft.store.JsonlSink): Weights & Biases (lazy import), the console's
progress display, nowhere.

Privacy: a sink receives exactly what the engine publishes (dpft/engine/train.py says which keys
are outside the DP guarantee); `live` records reach only the local display and are kept nowhere."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("dpft")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(logger_cfg) -> str:
    """disabled | offline | online. WANDB_MODE in the environment wins (tests set disabled)."""
    env = os.environ.get("WANDB_MODE")
    if env in ("disabled", "offline", "online", "dryrun"):
        return "offline" if env == "dryrun" else env
    mode = str(logger_cfg.wandb.mode)
    if mode == "auto":
        return "online" if _has_wandb_credentials() else "offline"
    if mode == "online" and not _has_wandb_credentials():
        # wandb.init would fail (or prompt) and the run would log nothing at all to W&B
        log.warning("logger=online but no W&B credentials (WANDB_API_KEY or `wandb login`): logging offline into "
                    "the run directory instead; upload later with `wandb sync <run dir>/wandb/offline-run-*`")
        return "offline"
    return mode


class MetricSink:
    """Where the training loop's records go (as torchtune's metric loggers). The loop calls `log`
    with each record it publishes (every ``train.log_every`` steps and at every evaluation: a dict
    with an int ``step``), `live` with every step's record (displays; nothing is kept),
    `log_summary` once with the finished run's summary; whoever made the sink calls `close` once
    with the run's exit code (0: finished)."""

    def log(self, record: dict) -> None:
        pass

    def live(self, record: dict) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


class NullSink(MetricSink):
    """Nowhere: data-parallel workers other than rank 0, or a run that logs nothing."""


class Sinks(MetricSink):
    """Fan-out: hands each record to every sink, in order; `close` closes them all, and re-raises
    the first failure only after the rest are closed."""

    def __init__(self, *sinks: MetricSink):
        self.sinks = [s for s in sinks if s is not None]

    def log(self, record: dict) -> None:
        for s in self.sinks:
            s.log(record)

    def live(self, record: dict) -> None:
        for s in self.sinks:
            s.live(record)

    def log_summary(self, summary: dict) -> None:
        for s in self.sinks:
            s.log_summary(summary)

    def close(self, exit_code: int = 0) -> None:
        error = None
        for s in self.sinks:
            try:
                s.close(exit_code)
            except BaseException as e:  # noqa: BLE001 - closed the others first
                error = error or e
        if error is not None:
            raise error


class WandbSink(MetricSink):
    """One W&B run per dpft run, living inside the run directory; always finished."""

    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str, run_id: str, mode: str,
                 resume_id: str | None = None, logged_through: int = 0):
        import wandb

        self._wandb = wandb
        w = logger_cfg.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group or os.environ.get("WANDB_RUN_GROUP"), tags=list(w.tags or []),
                              name=name, dir=str(run_dir), mode=mode, config=config,
                              settings=wandb.Settings(silent=True, console="off"),
                              reinit="finish_previous",
                              **({"id": resume_id, "resume": "allow"} if resume_id else {}))
        self.run.config.update({"dpft/run_id": run_id}, allow_val_change=True)
        self.run_id = self.run.id
        # A resumed run recomputes (identically) the steps its crashed attempt logged after the
        # checkpoint; W&B already has them, in the earlier segment of the same run id. Sending them
        # again would give `wandb sync` two overlapping segments, so they are not re-sent.
        self.logged_through = int(logged_through or 0)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        if step <= self.logged_through:
            return
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_summary(self, summary: dict) -> None:
        if summary.get("test_metrics"):  # generation tasks: the test tables, decoded after the last step
            self.log({"step": summary["steps"], **{f"test/{k}": v for k, v in summary["test_metrics"].items()}})
        flat = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
        flat.update({f"privacy/{k}": v for k, v in summary.get("privacy", {}).items()
                     if isinstance(v, (int, float, str, bool))})
        self.run.summary.update(flat)

    def close(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # pragma: no cover - tracker trouble never masks the run's status
            log.warning("W&B finish failed: %s", e)


def wandb_sink(cfg, run_dir: Path, config: dict, name: str, run_id: str, resume_id: str | None = None,
               logged_through: int = 0) -> WandbSink | None:
    """The run's W&B sink, or None when W&B is disabled or cannot start (tracking never costs a run)."""
    mode = wandb_mode(cfg.logger)
    if mode == "disabled":
        return None
    try:
        return WandbSink(cfg.logger, run_dir, config, name, run_id, mode, resume_id,
                         logged_through if resume_id else 0)
    except Exception as e:  # tracking must never cost a run
        log.warning("W&B disabled for this run: %s", " ".join(str(e).split())[:200])
        return None


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_eps(v) -> str:
    if isinstance(v, str):  # "inf" as the store writes it
        return "∞"
    return "∞" if v == float("inf") else f"{v:.3g}"


class Progress(MetricSink):
    """Live rich progress on a terminal (laid out to fit 80 columns); in a pipe, one plain line
    every `every` steps (about 20 per run, and every eval) with step, loss, ε spent and ETA.

    ε spent is read from each record's ``privacy/epsilon`` (the engine logs it from step 1; it
    depends only on σ, q and the step count, so it is public); without one the last known value
    stays."""

    KEYS = ("train/loss", "privacy/epsilon", "eval/accuracy")

    def __init__(self, mode: str, total: int, title: str, every: int | None = None, console=None):
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode, self.total, self.title = mode, total, title
        self.every = every or max(1, round(total / 20))
        self._bar = None
        self._t0 = time.monotonic()
        self._first = None
        self._last: dict = {}
        if mode == "rich":
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn

            console = console or Console(stderr=True)
            console.print(f"[bold]{escape(title)}[/]", highlight=False)  # the slug on its own line
            # bar 20 + "  100/100" + ETA 7 + "loss 0.693  ε 7.99  acc 0.864" ≈ 75 columns
            self._bar = RP(BarColumn(bar_width=20), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}", markup=False), console=console,
                           transient=False, expand=False)
            self._task = self._bar.add_task(title, total=total, info="")
            self._bar.start()

    def info(self) -> str:
        parts = []
        for key, label in (("train/loss", "loss"), ("privacy/epsilon", "ε"), ("eval/accuracy", "acc")):
            v = self._last.get(key)
            if key == "privacy/epsilon" and v is not None:
                parts.append(f"ε {_fmt_eps(v)}")
            elif isinstance(v, (int, float)):
                parts.append(f"{label} {v:.4g}")
        return "  ".join(parts)

    def eta(self, step: int) -> float | None:
        if self._first is None or step <= self._first[0]:
            return None
        s0, t0 = self._first
        return (time.monotonic() - t0) / (step - s0) * (self.total - step)

    def update(self, step: int, record: dict) -> None:
        if self._first is None:  # timed from the start (a resumed run from its first new step)
            self._first = (step - 1, self._t0)
        for key in self.KEYS:
            if record.get(key) is not None:
                self._last[key] = record[key]
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self.info())
        elif self.mode == "plain" and (step % self.every == 0 or step == self.total
                                       or any(k.startswith("eval/") for k in record)):
            print(f"[{self.title}] step {step}/{self.total}  {self.info()}  eta {_fmt_eta(self.eta(step))}",
                  file=sys.stderr, flush=True)

    def live(self, record: dict) -> None:
        self.update(int(record["step"]), record)

    def close(self, exit_code: int = 0) -> None:
        if self._bar is not None:
            self._bar.stop()
