"""Run one composed config into the store: skip finished ids, prepare before writing, record
status (running → done | failed | interrupted), always finish the tracker."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from dpft import store
from dpft.config import RunSpec
from dpft.errors import DpftError

log = logging.getLogger("dpft")


class AlreadyDone(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _archive_previous(path: Path) -> None:
    """A failed/interrupted attempt is kept under attempts/<k>/, never overwritten."""
    if not path.exists() or not any(p for p in path.iterdir() if p.name != "attempts"):
        return
    k = 1
    while (path / "attempts" / str(k)).exists():
        k += 1
    dest = path / "attempts" / str(k)
    dest.mkdir(parents=True)
    for item in list(path.iterdir()):
        if item.name != "attempts":
            shutil.move(str(item), dest / item.name)


def train_spec(spec: RunSpec, force: bool = False, resume: bool = False) -> dict:
    """Train `spec` into its run directory. With `resume`, an interrupted or crashed run continues
    from its last checkpoint (same batches, noise and accountant history as if never stopped)."""
    from dpft.engine import distributed
    from dpft.engine import train as engine

    cfg = spec.cfg
    path = store.run_dir(cfg.paths.output_dir, spec.run_id)
    dist = distributed.init(str(cfg.runtime.device)) if distributed.in_worker() else None
    try:
        if store.run_status(path) == "done" and not force:
            raise AlreadyDone(path)
        prep = engine.prepare(spec)  # bad input fails here, before anything is written
        if dist is not None and not dist.is_main:  # data-parallel worker: computes, writes nothing
            return _train_worker(spec, prep, path, resume and not force, dist)
        return _train_main(spec, prep, path, force, resume, dist)
    finally:
        if dist is not None:
            distributed.shutdown()


def _train_worker(spec: RunSpec, prep, path: Path, resume: bool, dist) -> dict:
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import train as engine
    from dpft.tracking import NullTracker, Progress

    dist.barrier()  # rank 0 has set up (or archived) the run directory
    state = ckpt.load(path / ckpt.NAME, spec.run_id) if resume and (path / ckpt.NAME).is_file() else None
    if state is not None:
        ckpt.check_data(state, prep.data_fingerprint(), path / ckpt.NAME)
    return engine.run(prep, path, NullTracker(), Progress("none", prep.steps, spec.slug), resume=state)


def _train_main(spec: RunSpec, prep, path: Path, force: bool, resume: bool, dist) -> dict:
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import train as engine
    from dpft.tracking import Progress, make_tracker

    cfg = spec.cfg
    state = None
    if resume and not force and (path / ckpt.NAME).is_file():
        state = ckpt.load(path / ckpt.NAME, spec.run_id)  # refuses a foreign or corrupt checkpoint
        ckpt.check_data(state, prep.data_fingerprint(), path / ckpt.NAME)  # ... or one on other data
    if state is None:
        _archive_previous(path)
        path.mkdir(parents=True, exist_ok=True)
        store.atomic_write_text(path / "config.yaml", engine.config_yaml(spec))
        store.atomic_write_text(path / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(spec.overrides))))
    if dist is not None:
        dist.barrier()
    previous = store.read_json(path / "meta.json") or {}
    meta = engine.meta(prep, "running", overrides=list(spec.overrides), choices=spec.choices)
    if dist is not None:
        meta["world_size"] = dist.world
    if state is not None:
        meta["resumed"] = previous.get("resumed", []) + [int(state["step"])]
    store.atomic_write_json(path / "meta.json", meta)
    tracker = make_tracker(cfg, path, OmegaConf.to_container(cfg, resolve=True), spec.slug, spec.run_id,
                           resume_id=previous.get("wandb_run_id") if state is not None else None)
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
