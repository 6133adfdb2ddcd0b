"""Where metrics go besides metrics.jsonl: Weights & Biases (lazy import) and the console."""

from __future__ import annotations

import logging
import os
import sys
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
    return mode


class NullTracker:
    run_id = None

    def log(self, record: dict, step: int) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """One W&B run per dpft run, living inside the run directory; always finished."""

    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str, run_id: str, mode: str,
                 resume_id: str | None = None):
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

    def log(self, record: dict, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def summary(self, summary: dict) -> None:
        flat = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
        flat.update({f"privacy/{k}": v for k, v in summary.get("privacy", {}).items()
                     if isinstance(v, (int, float, str, bool))})
        self.run.summary.update(flat)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg, run_dir: Path, config: dict, name: str, run_id: str, resume_id: str | None = None):
    mode = wandb_mode(cfg.logger)
    if mode == "disabled":
        return NullTracker()
    try:
        return WandbTracker(cfg.logger, run_dir, config, name, run_id, mode, resume_id)
    except Exception as e:  # tracking must never cost a run
        log.warning("W&B disabled for this run: %s", " ".join(str(e).split())[:200])
        return NullTracker()


class Progress:
    """Live rich progress on a terminal; plain log lines (at evals) otherwise."""

    def __init__(self, mode: str, total: int, title: str):
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode, self.total, self.title = mode, total, title
        self._bar = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeRemainingColumn

            self._bar = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task(title, total=total, info="")
            self._bar.start()
        self._last = {}

    def update(self, step: int, record: dict) -> None:
        for key in ("train/loss", "privacy/epsilon", "eval/accuracy"):
            if record.get(key) is not None:
                self._last[key] = record[key]
        info = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in self._last.items() if isinstance(v, float))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain" and any(k.startswith("eval/") for k in record):
            print(f"[{self.title}] step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
