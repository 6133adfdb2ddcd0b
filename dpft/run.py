"""Run one composed config into the store: one owner per run directory (a lock), skip finished
ids, continue a valid checkpoint by default, prepare before writing, record status
(running → done | failed | interrupted), always finish the tracker."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from dpft import store
from dpft.config import RunSpec
from dpft.errors import DpftError

log = logging.getLogger("dpft")
CHECKPOINT = "checkpoint.pt"  # dpft.engine.checkpoint.NAME, named here so the done-check imports no torch


class AlreadyDone(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def say(message: str) -> None:
    """One line about what a run is doing (starting, resuming, archived, waiting), on stdout with the
    summary: stderr is for the one-line error of a run that fails."""
    print(message, file=sys.stdout, flush=True)


def _archive_previous(path: Path) -> Path | None:
    """A failed/interrupted attempt is kept under attempts/<k>/, never overwritten. Returns it."""
    if not path.exists() or not any(p for p in path.iterdir() if p.name != "attempts"):
        return None
    k = 1
    while (path / "attempts" / str(k)).exists():
        k += 1
    dest = path / "attempts" / str(k)
    dest.mkdir(parents=True)
    for item in list(path.iterdir()):
        if item.name != "attempts":
            shutil.move(str(item), dest / item.name)
    return dest


def check_flags(force: bool = False, resume: bool | None = None, restart: bool = False) -> None:
    if resume and (force or restart):
        which = "--force" if force else "--restart"
        raise DpftError(f"--resume continues the run's checkpoint and {which} archives it and starts over: pick one")


def train_spec(spec: RunSpec, force: bool = False, resume: bool | None = None, restart: bool = False,
               wait: bool = False, notify=say) -> dict:
    """Train `spec` into its run directory, owning it (a second process refuses, or waits with
    `wait`). `resume`: None (default) continues a valid checkpoint of this run if one exists —
    same batches, noise and accountant history as if never stopped — and starts at step 1
    otherwise; True requires a checkpoint. `restart` archives an unfinished attempt (checkpoint
    included) under attempts/<k>/ and starts over; `force` does that to a finished run too."""
    check_flags(force, resume, restart)
    cfg = spec.cfg
    path = store.run_dir(cfg.paths.output_dir, spec.run_id)
    if store.run_status(path) == "done" and not force:  # before any heavy import: a skip is instant
        raise AlreadyDone(path)
    from dpft.engine import distributed

    dist = distributed.init(str(cfg.runtime.device)) if distributed.in_worker() else None
    lock = None
    try:
        if dist is None or dist.is_main:
            lock = store.RunLock(path)
            try:
                lock.acquire(wait=wait, on_wait=lambda owner: notify(
                    f"waiting for {store.describe_owner(owner)} to finish {path} …"))
            except store.RunLocked as e:
                raise DpftError(f"run {spec.run_id} is in use by {store.describe_owner(e.owner)} ({path}); "
                                "wait for it with --wait, or stop that process") from None
            if store.run_status(path) == "done" and not force:  # finished while we waited
                raise AlreadyDone(path)
        fresh = force or restart
        if resume and not fresh and not (path / CHECKPOINT).is_file():
            status = store.run_status(path)
            raise DpftError(f"--resume: no checkpoint in {path} ("
                            + (f"the run is {status}, stopped before its first checkpoint" if status else
                               "no such run yet") + "); run without --resume to start it from step 1")
        from dpft.engine.prepare import prepare

        prep = prepare(spec)  # bad input fails here, before anything is written
        if dist is not None and not dist.is_main:  # data-parallel worker: computes, writes nothing
            return _train_worker(spec, prep, path, dist)
        return _train_main(spec, prep, path, fresh, dist, notify)
    finally:
        if lock is not None:
            lock.release()
        if dist is not None:
            distributed.shutdown()


def _train_worker(spec: RunSpec, prep, path: Path, dist) -> dict:
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import train as engine
    from dpft.tracking import NullTracker, Progress

    dist.barrier()  # rank 0 has set up (or archived) the run directory: a checkpoint there is its choice
    state = ckpt.load(path / ckpt.NAME, spec.run_id) if (path / ckpt.NAME).is_file() else None
    if state is not None:
        ckpt.check_data(state, prep.data_fingerprint(), path / ckpt.NAME)
    return engine.run(prep, path, NullTracker(), Progress("none", prep.steps, spec.slug), resume=state)


def _train_main(spec: RunSpec, prep, path: Path, fresh: bool, dist, notify) -> dict:
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import ledger
    from dpft.engine import train as engine
    from dpft.tracking import Progress, make_tracker

    cfg = spec.cfg
    state = None
    name = f"{spec.slug} [{spec.run_id}]"
    if not fresh and (path / ckpt.NAME).is_file():
        # refuses a foreign, corrupt or other-version checkpoint whole (re-run with --restart to start over)
        state = ckpt.load(path / ckpt.NAME, spec.run_id)
        ckpt.check_data(state, prep.data_fingerprint(), path / ckpt.NAME)  # ... or one on other data
    previous = store.read_json(path / "meta.json") or {}
    logged_through = 0
    if state is None:
        before = store.run_status(path)
        archived = _archive_previous(path)
        path.mkdir(parents=True, exist_ok=True)
        store.atomic_write_text(path / "config.yaml", ledger.config_yaml(spec))
        store.atomic_write_text(path / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(spec.overrides))))
        if archived is not None:
            why = "--force" if before == "done" else ("--restart" if fresh else "no checkpoint to resume")
            notify(f"starting {name} at step 1 of {prep.steps} in {path}; the previous attempt "
                   f"({before or 'unknown'}, {why}) is kept in {archived}")
        else:
            notify(f"starting {name}: {prep.steps} steps in {path}")
        previous = {}
    else:
        # W&B already holds the steps the crashed attempt logged after its checkpoint; sending them
        # again would overlap the two segments (seeded runs recompute them identically; secure runs
        # recompute them with fresh noise and the engine charges them to the accountant again)
        logged_through = store.last_step(path / "metrics.jsonl")
        again = max(0, logged_through - int(state["step"]))
        fresh_noise = prep.method.private and str(cfg.privacy.get("noise", "secure")) != "seeded"
        notify(f"resuming {name} at step {int(state['step']) + 1} of {prep.steps} from its checkpoint in {path} "
               + (f"with fresh noise ({again} already-logged step(s) charged again) " if fresh_noise else "")
               + "(--restart starts over)")
    if dist is not None:
        dist.barrier()
    meta = ledger.meta(prep, "running", overrides=list(spec.overrides), choices=spec.choices, steps=prep.steps)
    if dist is not None:
        meta["world_size"] = dist.world
    if state is not None:
        meta["resumed"] = previous.get("resumed", []) + [int(state["step"])]
    store.atomic_write_json(path / "meta.json", meta)
    tracker = make_tracker(cfg, path, OmegaConf.to_container(cfg, resolve=True), spec.slug, spec.run_id,
                           resume_id=previous.get("wandb_run_id") if state is not None else None,
                           logged_through=logged_through)
    meta["wandb_run_id"] = tracker.run_id
    store.atomic_write_json(path / "meta.json", meta)
    progress = Progress(str(cfg.runtime.progress), prep.steps, spec.slug)
    status, exit_code = "failed", 1
    try:
        summary = engine.run(prep, path, tracker, progress, resume=state)
        status, exit_code = "done", 0
        return summary
    except KeyboardInterrupt:
        status, exit_code = "interrupted", 130
        raise
    except DpftError as e:
        meta["error"] = str(e)
        raise
    except Exception as e:
        meta["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        raise
    finally:
        progress.close()
        try:
            tracker.finish(exit_code)
        except Exception as e:  # pragma: no cover - tracker trouble never masks the run's status
            log.warning("W&B finish failed: %s", e)
        meta.update(status=status, time_end=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.atomic_write_json(path / "meta.json", meta)
