"""`run(prep, ...)`: the training loop every method shares.

`dpft.engine.prepare.prepare(spec)` builds the data, model, method and public privacy parameters
before the run directory is touched; `run` then builds the step (`dpft.engine.stepper.Stepper`),
draws Poisson-sampled logical batches (`dpft.engine.batches`) split into physical micro-batches,
steps, charges the accountant, evaluates (`dpft.engine.evaluate`), checkpoints
(`dpft.engine.checkpoint`) and returns the summary with its privacy ledger (`dpft.engine.ledger`).

What a run publishes (metrics.jsonl, W&B, the progress display): `privacy/*` (σ, C, q, ε spent:
public), `eval/*` (the public evaluation set), `method/*` (computed from privatised gradients and
public numbers only), `lr`, `step`. Everything under `train/` is a NON-PRIVATE statistic of the
private batch (loss, exact Poisson batch size, clipped fraction, norm quantiles, the alignment
cosines that use the clipped sum, step time): outside the DP guarantee, listed in the summary's
`nonprivate_metrics`, and dropped with `diagnostics.nonprivate=false` (the mode for real private
data).
"""

from __future__ import annotations

import time

import torch

from dpft.engine import accountant as acct
from dpft.engine import ledger, noise
from dpft.engine.batches import PoissonBatches, ShuffleBatches, chunks
from dpft.engine.evaluate import eval_steps as plan_evals
from dpft.engine.evaluate import evaluate
from dpft.engine.prepare import Prepared
from dpft.engine.stepper import Stepper
from dpft.errors import DpftError
from dpft.methods import PrivacyParams
from dpft.store import RunDir
from dpft.tracking import MetricSink

NONPRIVATE_PREFIX = "train/"


def run(prep: Prepared, rundir: RunDir, sinks: MetricSink, resume: dict | None = None) -> dict:
    """Train; hand each record to `sinks` (dpft/tracking.py) and keep the checkpoints, the summary
    and the generations in `rundir` (dpft/store.py: the engine names no file). Returns the summary.
    `resume` is a loaded checkpoint: training continues after its step with its exact state."""
    from dpft.engine import checkpoint as ckpt

    cfg, method, device = prep.spec.cfg, prep.method, prep.device
    torch.manual_seed(int(cfg.seed))
    n = len(prep.train_enc)
    privacy = None
    if method.private:
        privacy = PrivacyParams(sigma=prep.sigma, clip_norm=float(cfg.privacy.clip_norm), sample_rate=prep.sample_rate,
                                expected_batch_size=prep.sample_rate * prep.public_n(), steps=prep.steps,
                                delta=prep.delta)
    from dpft.engine import distributed

    dist = distributed.current()
    main = dist is None or dist.is_main
    start = 1 if resume is None else int(resume["step"]) + 1
    source = None
    if method.private:
        # the mechanism's randomness: never a function of the public seed unless privacy.noise=seeded
        source = noise.NoiseSource.create(str(cfg.privacy.get("noise", "secure")), int(cfg.seed),
                                          prep.spec.run_id, dist)
    stepper = Stepper(prep.model, method, cfg, privacy=privacy, steps=prep.steps, noise=source, dist=dist)
    model, params = stepper.model, stepper.params
    accountant = None
    if method.private:  # a resumed run continues the checkpoint's ledger
        accountant = acct.Accountant(cfg.privacy.accountant, history=resume["accountant_history"] if resume else ())
        batches = PoissonBatches(n, prep.sample_rate, source, start=start)
    else:
        batches = ShuffleBatches(n, int(cfg.train.batch_size), int(cfg.seed) + 1)
    data_fp = prep.data_fingerprint()
    meter = acct.EpsilonMeter(str(cfg.privacy.accountant), prep.delta) if method.private else None
    nonprivate_diag = bool(cfg.diagnostics.get("nonprivate", True))
    logged_keys: set[str] = set()
    evals: list[dict] = []
    lost = 0
    if resume is not None:
        ckpt.check_data(resume, data_fp, rundir.checkpoint)
        stepper.load_state_dict(resume)
        torch.set_rng_state(resume["rng"]["torch"])
        if accountant is not None:
            if not source.reproducible:
                # fresh noise from here on: steps after the checkpoint that were already logged
                # (and so possibly released) before the crash were a separate release — charge them
                lost = rundir.logged_after(start - 1)
                accountant.step(method.noise_multiplier(), prep.sample_rate, steps=lost)
        else:
            batches.load_state_dict(resume["batches"])
        logged_keys = set(resume.get("logged_keys", []))
        evals = [dict(e) for e in resume["evals"]]
        if main:
            rundir.truncate_metrics(start - 1)
    if dist is not None:
        dist.broadcast_(params.values())
    stepper.attach()

    def save_checkpoint(step: int) -> None:
        ckpt.save(rundir.checkpoint, {
            "run_id": prep.spec.run_id, "step": step,
            **stepper.state_dict(),  # model (trainable weights), optimizer, schedule, method
            # the Poisson batches and the noise have no state here: they are (key, step) draws
            "batches": batches.state_dict() if not method.private else {},
            "rng": {"torch": torch.get_rng_state()},  # dropout etc.: non-private randomness
            "accountant_history": [list(h) for h in accountant.history] if accountant is not None else [],
            "data_fingerprint": data_fp, "noise": source.mode if source is not None else None,
            "logged_keys": sorted(logged_keys),
            "evals": evals,
            "wall_time_s": time.time() - t0 + (float(resume.get("wall_time_s", 0.0)) if resume else 0.0),
        })

    eval_steps = plan_evals(cfg, prep.steps)
    primary = str(cfg.task.metric)
    t0 = time.time()
    pbs, log_every = int(cfg.runtime.physical_batch_size), max(1, int(cfg.train.log_every))
    every = cfg.runtime.get("checkpoint_every")
    eps = 0.0
    stop = _DeferredSignals()
    try:
        for step in range(start, prep.steps + 1):
            idx = next(batches)
            if dist is not None:  # every rank drew the same logical batch; each clips its shard
                idx = dist.shard(idx)
            micro = chunks(prep.train_enc, idx, pbs, device, cfg.engine.get("autocast"))
            if step == start:
                before = {n: _fingerprint(p) for n, p in params.items()}
            ts = time.perf_counter()
            stats = stepper.step(micro, step, alignment=nonprivate_diag and bool(cfg.diagnostics.alignment),
                                 per_layer=bool(cfg.diagnostics.per_layer))
            if method.private:
                accountant.step(method.noise_multiplier(), prep.sample_rate)
            step_time = time.perf_counter() - ts
            record = {"step": step, "lr": stepper.lr}
            if step == start:
                moved = _check_moved(before, params)
            # train/*: non-private statistics of the private batch (module docstring)
            record.update({"train/step_time": step_time, **({"train/moved_frac": moved} if step == start else {})})
            record.update({f"train/{k}": v for k, v in stats.items()})
            diag = method.diagnostics()
            prefix = "train/method/" if method.nonprivate_diagnostics else "method/"
            record.update({f"{prefix}{k}": v for k, v in diag.items()})
            # a method's own cost as a fraction of the whole step (timing of the private batch)
            record.update({f"train/method/{k}_frac": v / step_time for k, v in diag.items()
                           if k.endswith("time_s") and step_time > 0})
            if not nonprivate_diag:
                record = {k: v for k, v in record.items() if not k.startswith(NONPRIVATE_PREFIX)}
            if method.private:  # public: σ, q, δ and the step count
                eps = meter.epsilon(accountant.history, exact=step in eval_steps) if main else eps
                if eps is not None:
                    record["privacy/epsilon"] = eps
            if step in eval_steps and main:
                ev = evaluate(model, prep.eval_enc, device, int(cfg.runtime.eval_batch_size), cfg.task)
                if prep.gen is not None and prep.gen.due(step, prep.steps):
                    ev.update(prep.gen.score(model, device, int(cfg.runtime.eval_batch_size), "eval",
                                             rundir, step))
                record.update({f"eval/{k}": v for k, v in ev.items()})
                record.update(ledger.privacy_record(method, privacy, eps))
                evals.append({"step": step, **ev})
            if step % log_every == 0 or step in eval_steps:
                sinks.log(record)
                logged_keys.update(k for k in record if k.startswith(NONPRIVATE_PREFIX))
            sinks.live(record)
            if stop.requested if dist is None else dist.any(stop.requested):
                # SIGTERM/SIGINT: checkpoint at this step boundary, then stop
                if step < prep.steps and main:
                    save_checkpoint(step)
                raise KeyboardInterrupt
            if every and step % int(every) == 0 and step < prep.steps and main:
                save_checkpoint(step)
    finally:
        stop.restore()
        stepper.close()

    wall = time.time() - t0 + (float(resume.get("wall_time_s", 0.0)) if resume else 0.0)
    summary = ledger.summary(cfg, prep, method, evals, primary, wall, accountant, source)
    summary["nonprivate_metrics"] = sorted(logged_keys)
    summary["diagnostics"] = "nonprivate logged" if nonprivate_diag else "DP outputs and public evaluations only"
    if resume is not None:
        summary["resumed_from_step"] = start - 1
        if lost:
            summary["privacy"]["steps_charged_twice"] = lost
    if dist is not None:
        summary["world_size"] = dist.world
    if not main:  # rank 0 alone evaluates and writes the run
        return summary
    if prep.gen is not None and prep.gen.test is not None:  # the test tables, decoded once at the end
        summary["test_metrics"] = prep.gen.score(model, device, int(cfg.runtime.eval_batch_size), "test", rundir,
                                                 prep.steps)
    rundir.write_summary(summary)
    sinks.log_summary(summary)
    rundir.remove_checkpoint()  # done: the summary and metrics are the record
    return summary


class _DeferredSignals:
    """SIGTERM/SIGINT set a flag that the loop honours at the next step boundary, so the
    checkpoint is consistent; a second signal interrupts at once."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _fingerprint(p) -> tuple[float, float]:
    """(Σ p, Σ p²) in float64: an Adam step of ±lr per entry can leave Σ p unchanged (as many up as
    down, e.g. a 2-entry head bias half the time), but not both."""
    x = p.detach().double()
    return float(x.sum()), float(x.square().sum())


def _check_moved(before: dict, params: dict) -> float:
    """Fraction of trainable tensors the first step changed. Zero means the update never reached
    the weights (e.g. LoRA wrapped before the device move, Opacus #820): stop rather than train
    nothing while spending privacy."""
    moved = sum(_fingerprint(p) != before[n] for n, p in params.items())
    if moved == 0:
        raise DpftError("the first optimizer step changed no trainable weight; refusing to continue")
    return moved / max(len(params), 1)
