"""Run one composed config into the store: one owner per run directory (a lock), skip finished
ids, continue a valid checkpoint by default, prepare before writing, record status
(running → done | failed | interrupted), always close the metric sinks. The run directory's files
are the store's business (dpft/store.py RunDir); this module decides when each is written."""

from __future__ import annotations

import sys
from pathlib import Path

from dpft import store
from dpft.config import RunSpec
from dpft.errors import DpftError


class AlreadyDone(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def say(message: str) -> None:
    """One line about what a run is doing (starting, resuming, archived, waiting), on stdout with the
    summary: stderr is for the one-line error of a run that fails."""
    print(message, file=sys.stdout, flush=True)


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
    rundir = store.Store(cfg.paths.output_dir).run(spec.run_id)
    path = rundir.path
    if rundir.status() == "done" and not force:  # before any heavy import: a skip is instant
        raise AlreadyDone(path)
    from dpft.engine import distributed

    dist = distributed.init(str(cfg.runtime.device)) if distributed.in_worker() else None
    lock = None
    try:
        if dist is None or dist.is_main:
            lock = rundir.lock()
            try:
                lock.acquire(wait=wait, on_wait=lambda owner: notify(
                    f"waiting for {store.describe_owner(owner)} to finish {path} …"))
            except store.RunLocked as e:
                raise DpftError(f"run {spec.run_id} is in use by {store.describe_owner(e.owner)} ({path}); "
                                "wait for it with --wait, or stop that process") from None
            if rundir.status() == "done" and not force:  # finished while we waited
                raise AlreadyDone(path)
        fresh = force or restart
        if resume and not fresh and not rundir.has_checkpoint():
            status = rundir.status()
            raise DpftError(f"--resume: no checkpoint in {path} ("
                            + (f"the run is {status}, stopped before its first checkpoint" if status else
                               "no such run yet") + "); run without --resume to start it from step 1")
        from dpft.engine.prepare import prepare

        prep = prepare(spec)  # bad input fails here, before anything is written
        if dist is not None and not dist.is_main:  # data-parallel worker: computes, writes nothing
            return _train_worker(spec, prep, rundir, dist)
        return _train_main(spec, prep, rundir, fresh, dist, notify)
    finally:
        if lock is not None:
            lock.release()
        if dist is not None:
            distributed.shutdown()


def _train_worker(spec: RunSpec, prep, rundir: store.RunDir, dist) -> dict:
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import train as engine
    from dpft.tracking import NullSink

    dist.barrier()  # rank 0 has set up (or archived) the run directory: a checkpoint there is its choice
    state = ckpt.load(rundir.checkpoint, spec.run_id) if rundir.has_checkpoint() else None
    if state is not None:
        ckpt.check_data(state, prep.data_fingerprint(), rundir.checkpoint)
    return engine.run(prep, rundir, NullSink(), resume=state)  # rank 0 alone logs and writes


def _train_main(spec: RunSpec, prep, rundir: store.RunDir, fresh: bool, dist, notify) -> dict:
    from omegaconf import OmegaConf

    from dpft.engine import checkpoint as ckpt
    from dpft.engine import ledger
    from dpft.engine import train as engine
    from dpft.tracking import Progress, Sinks, wandb_sink

    cfg = spec.cfg
    path = rundir.path
    state = None
    name = f"{spec.slug} [{spec.run_id}]"
    if not fresh and rundir.has_checkpoint():
        # refuses a foreign, corrupt or other-version checkpoint whole (re-run with --restart to start over)
        state = ckpt.load(rundir.checkpoint, spec.run_id)
        ckpt.check_data(state, prep.data_fingerprint(), rundir.checkpoint)  # ... or one on other data
    previous = rundir.meta() or {}
    logged_through = 0
    if state is None:
        before = rundir.status()
        archived = rundir.begin(ledger.config_yaml(spec), list(spec.overrides))
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
        logged_through = rundir.last_step()
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
    rundir.write_meta(meta)
    wandb = wandb_sink(cfg, path, OmegaConf.to_container(cfg, resolve=True), spec.slug, spec.run_id,
                       resume_id=previous.get("wandb_run_id") if state is not None else None,
                       logged_through=logged_through)
    meta["wandb_run_id"] = wandb.run_id if wandb is not None else None
    rundir.write_meta(meta)
    # the order of today's writes: the run's file first, then W&B, then the display
    sinks = Sinks(rundir.metrics_sink(), wandb, Progress(str(cfg.runtime.progress), prep.steps, spec.slug))
    status, exit_code = "failed", 1
    try:
        summary = engine.run(prep, rundir, sinks, resume=state)
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
        try:
            sinks.close(exit_code)
        finally:
            rundir.finish(meta, status)
