"""`train(spec)`: the one training path every method shares.

data → tokenizer → model → per-sample hooks (Opacus) → σ calibration → Poisson-sampled logical
batches split into physical micro-batches → `dp_step` → periodic eval → summary. Everything that
can fail on bad input (data, model, sizes, calibration) runs in `prepare` before the run
directory is touched.

What a run publishes (metrics.jsonl, W&B, the progress display): `privacy/*` (σ, C, q, ε spent:
public), `eval/*` (the public evaluation set), `method/*` (computed from privatised gradients and
public numbers only), `lr`, `step`. Everything under `train/` is a NON-PRIVATE statistic of the
private batch (loss, exact Poisson batch size, clipped fraction, norm quantiles, the alignment
cosines that use the clipped sum, step time): outside the DP guarantee, listed in the summary's
`nonprivate_metrics`, and dropped with `diagnostics.nonprivate=false` (the mode for real private
data).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpft import __version__
from dpft.config import RunSpec
from dpft.data.tasks import TaskData, is_generation, load_task
from dpft.engine import accountant as acct
from dpft.engine import noise
from dpft.engine.step import Batch, dp_step, nonprivate_step
from dpft.errors import DpftError
from dpft.methods import PrivacyParams, build_method
from dpft.store import RunDir
from dpft.tracking import MetricSink

log = logging.getLogger("dpft")

NONPRIVATE_PREFIX = "train/"


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # [N] class ids, or [N, L] token targets for causal LMs (dpft.engine.generation)
    token_type_ids: torch.Tensor | None = None
    loss_reduction: str = "mean"  # causal LMs: per-sequence mean or sum over target tokens

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx, device) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.attention_mask[idx]
        t = max(int(mask.sum(1).max()), 1) if len(idx) else 1  # trim padding per micro-batch
        take = lambda x: None if x is None else x[idx, :t].to(device)  # noqa: E731
        labels = take(self.labels) if self.labels.dim() == 2 else self.labels[idx].to(device)
        return Batch(take(self.input_ids), mask[:, :t].to(device), labels, take(self.token_type_ids),
                     self.loss_reduction)


@dataclass
class Prepared:
    spec: RunSpec
    data: TaskData
    train_enc: Encoded
    eval_enc: Encoded
    model: torch.nn.Module
    method: object
    device: torch.device
    steps: int
    sample_rate: float
    delta: float | None
    sigma: float | None
    info: dict = field(default_factory=dict)
    # N that q = B/N, δ and the noise normaliser B are computed from: len(train_enc), except under
    # `dpft audit`, whose canaries count as all present (public parameters independent of which are in)
    dataset_size: int | None = None

    gen: object | None = None  # generation tasks: dpft.engine.generation.GenerationEval

    def data_fingerprint(self) -> str:
        """Hash of the encoded training set: kept in checkpoints (private) so that a resume on
        other data is refused."""
        if "data_fingerprint" not in self.info:
            e = self.train_enc
            self.info["data_fingerprint"] = noise.fingerprint(e.input_ids, e.attention_mask, e.labels,
                                                              e.token_type_ids)
        return self.info["data_fingerprint"]

    def public_n(self) -> int:
        return self.dataset_size if self.dataset_size is not None else len(self.train_enc)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DpftError(f"runtime.device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DpftError(f"runtime.device={name} but no CUDA device is available")
    return dev


def encode(tokenizer, split, max_length: int) -> Encoded:
    cols = list(zip(*split.texts))
    enc = tokenizer(*[list(c) for c in cols[:2]], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long),
                   enc.get("token_type_ids"))


def plan_steps(cfg, sample_rate: float) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return max(1, math.ceil(float(cfg.train.epochs) / sample_rate))


def prepare(spec: RunSpec, canaries=None) -> Prepared:
    """`canaries` (only `dpft audit`, see dpft/audit.py) appends the included audit canaries to the
    training set; q, σ and δ are then those of the data set with all m candidates in."""
    from dpft.models import apply_peft, load_classifier, load_tokenizer

    cfg = spec.cfg
    if cfg.runtime.num_threads:
        torch.set_num_threads(int(cfg.runtime.num_threads))
    device = resolve_device(str(cfg.runtime.device))
    method = build_method(cfg)
    data = load_task(cfg.task)
    n = len(data.train)
    if canaries is not None:
        data.train = canaries.insert(data.train)
        n += canaries.m
    bs = int(cfg.train.batch_size)
    if bs > n:
        raise DpftError(f"train.batch_size={bs} is larger than the training set ({n} examples)")
    q = bs / n
    steps = plan_steps(cfg, q)
    delta = sigma = None
    if method.private:
        noise.check_mode(str(cfg.privacy.get("noise", "secure")))
        delta = float(cfg.privacy.delta) if cfg.privacy.delta is not None else acct.default_delta(n)
        # δ ≥ 1/N admits mechanisms that publish one example outright (N is public, as in q)
        if delta >= 1.0 / n and not bool(cfg.privacy.get("unsafe_delta", False)):
            raise DpftError(f"δ={delta:.3g} is ≥ 1/N = 1/{n} ({'derived as N^-1.1' if cfg.privacy.delta is None else 'privacy.delta'}): "
                            "such a δ permits releasing an example outright; lower it, add data, or set "
                            "privacy.unsafe_delta=true")
        sigma = (float(cfg.privacy.noise_multiplier) if cfg.privacy.noise_multiplier is not None
                 else acct.calibrate_sigma(float(cfg.privacy.epsilon), delta, q, steps, cfg.privacy.accountant))
        ceiling = cfg.privacy.get("max_epsilon")
        if ceiling is not None:
            planned = acct.make_accountant(cfg.privacy.accountant)
            planned.history = [(sigma, q, steps)]
            if acct.epsilon_of(planned, delta) > float(ceiling):
                raise DpftError(f"the planned run spends ε={acct.epsilon_of(planned, delta):.3f} > "
                                f"privacy.max_epsilon={ceiling}; refusing to train")
    tokenizer = load_tokenizer(cfg.model)
    gen = None
    if is_generation(cfg.task):  # causal LM, loss on target tokens, decoding metrics
        from dpft.engine import generation
        from dpft.models import load_causal_lm

        codec = generation.PromptCodec(tokenizer, cfg.task)
        red = str(cfg.task.get("loss_reduction", "mean"))
        train_enc = generation.encode_pairs(codec, data.train, int(cfg.task.max_length), red)
        eval_enc = generation.encode_pairs(codec, data.eval, int(cfg.task.max_length), red)
        gen = generation.GenerationEval(cfg.task, codec, data)
        # Opacus ghost clipping refuses tied *trainable* input/output embeddings; hooks handle
        # tying exactly, and under LoRA the embedding is frozen
        untie = (method.private and str(cfg.engine.grad_sample_mode) in ("ghost", "bk")
                 and not cfg.model.get("peft"))
        model = load_causal_lm(cfg.model, int(cfg.seed), untie=untie)
    else:
        train_enc = encode(tokenizer, data.train, int(cfg.task.max_length))
        eval_enc = encode(tokenizer, data.eval, int(cfg.task.max_length))
        model = load_classifier(cfg.model, len(data.labels), int(cfg.seed))
    model.to(device)  # before any wrapping (Opacus #820: moving after PEFT/hooks corrupts updates)
    model = apply_peft(model, cfg.model)
    return Prepared(spec, data, train_enc, eval_enc, model, method, device, steps, q, delta, sigma, dataset_size=n,
                    gen=gen)


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"dpft": __version__, "python": platform.python_version()}
    for pkg in ("torch", "opacus", "transformers", "hydra-core", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def evaluate(model, enc: Encoded, device, batch_size: int, task_cfg) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    if enc.labels.dim() == 2:  # causal LM: eval loss and perplexity (decoding metrics: prep.gen)
        from dpft.engine.generation import eval_loss

        return eval_loss(model, enc, device, batch_size)
    was_training = model.training
    model.eval()
    preds = []
    from dpft.models import model_inputs

    with torch.no_grad():
        for start in range(0, len(enc), batch_size):
            b = enc.batch(range(start, min(start + batch_size, len(enc))), device)
            logits = model(**model_inputs(model, b.input_ids, b.attention_mask, b.token_type_ids)).logits
            preds.append(logits.argmax(-1).cpu())
    model.train(was_training)  # Opacus only captures activations in training mode
    y, p = enc.labels.numpy(), torch.cat(preds).numpy()
    out = {"accuracy": float(accuracy_score(y, p))}
    if "f1" in list(task_cfg.get("extra_metrics", []) or []):
        out["f1"] = float(f1_score(y, p))
    return out


def steps_to(evals: list[dict], key: str, threshold: float) -> int | None:
    for rec in evals:
        if rec.get(key) is not None and rec[key] >= threshold:
            return int(rec["step"])
    return None


def _eval_steps(cfg, steps: int) -> set[int]:
    out = {steps}
    if cfg.train.eval_every:
        out.update(range(int(cfg.train.eval_every), steps + 1, int(cfg.train.eval_every)))
    out.update(int(s) for s in cfg.train.eval_at if 0 < int(s) <= steps)
    return out


def _chunks(enc: Encoded, idx: list[int], size: int, device, autocast: str | None = None) -> list[Batch]:
    chunks = [enc.batch(idx[i:i + size], device) for i in range(0, len(idx), size)]
    for c in chunks:
        c.autocast = autocast
    return chunks


def attach_hooks(model, mode: str, clip_norm: float):
    """Opacus per-sample machinery attached *without wrapping* the model, so HF methods and
    attribute access keep working."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DpftError(f"model has layers DP training cannot handle: {errors[0]}")
    if mode == "hooks":
        return GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    # ghost/bk: float64 norms with rigorous rounding-error bounds (dpft/engine/bookkeeping.py)
    from dpft.engine.bookkeeping import ClipHooks, check_hooked_gradients

    check_hooked_gradients(model)  # refuse weights that get gradient outside their hooked call
    return ClipHooks(model, batch_first=True, loss_reduction="sum", strict=False, max_grad_norm=clip_norm)


def run(prep: Prepared, rundir: RunDir, sinks: MetricSink, resume: dict | None = None) -> dict:
    """Train; hand each record to `sinks` (dpft/tracking.py) and keep the checkpoints, the summary
    and the generations in `rundir` (dpft/store.py: the engine names no file). Returns the summary.
    `resume` is a loaded checkpoint: training continues after its step with its exact state."""
    from dpft.engine import checkpoint as ckpt

    cfg, method, model, device = prep.spec.cfg, prep.method, prep.model, prep.device
    torch.manual_seed(int(cfg.seed))
    model.train()
    model = method.prepare_model(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = len(prep.train_enc)
    privacy = None
    if method.private:
        privacy = PrivacyParams(sigma=prep.sigma, clip_norm=float(cfg.privacy.clip_norm), sample_rate=prep.sample_rate,
                                expected_batch_size=prep.sample_rate * prep.public_n(), steps=prep.steps,
                                delta=prep.delta)
    method.setup(model, params, privacy)
    optimizer = method.build_optimizer(params, cfg.optim)
    from dpft.engine.optim import build_schedule

    schedule = build_schedule(optimizer, cfg.train, prep.steps)
    mode = str(cfg.engine.grad_sample_mode)
    hooks = None
    accountant = None
    if method.private:
        if mode in ("ghost", "bk") and not method.supports_ghost:
            raise DpftError(f"method {method.name} does not support ghost clipping; use engine.grad_sample_mode=hooks")
        if abs(method.noise_multiplier() - prep.sigma) > 1e-9 * max(1.0, prep.sigma):
            raise DpftError(f"method {method.name} spends σ_eff={method.noise_multiplier()} but σ={prep.sigma} was calibrated")
        accountant = acct.make_accountant(cfg.privacy.accountant)
    from dpft.engine import distributed

    dist = distributed.current()
    main = dist is None or dist.is_main
    start = 1 if resume is None else int(resume["step"]) + 1
    source = None
    if method.private:
        # the mechanism's randomness: never a function of the public seed unless privacy.noise=seeded
        source = noise.NoiseSource.create(str(cfg.privacy.get("noise", "secure")), int(cfg.seed),
                                          prep.spec.run_id, dist)
        batches = noise.PoissonBatches(n, prep.sample_rate, source, start=start)
    else:
        batches = ckpt.ShuffleBatches(n, int(cfg.train.batch_size), int(cfg.seed) + 1)
    data_fp = prep.data_fingerprint()
    meter = acct.EpsilonMeter(str(cfg.privacy.accountant), prep.delta) if method.private else None
    nonprivate_diag = bool(cfg.diagnostics.get("nonprivate", True))
    logged_keys: set[str] = set()
    evals: list[dict] = []
    lost = 0
    if resume is not None:
        ckpt.check_data(resume, data_fp, rundir.checkpoint)
        with torch.no_grad():
            for name, value in resume["model"].items():
                params[name].copy_(value.to(device))
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        method.load_state_dict(resume["method"])
        torch.set_rng_state(resume["rng"]["torch"])
        if accountant is not None:
            accountant.history = [tuple(h) for h in resume["accountant_history"]]
            if not source.reproducible:
                # fresh noise from here on: steps after the checkpoint that were already logged
                # (and so possibly released) before the crash were a separate release — charge them
                lost = rundir.logged_after(start - 1)
                for _ in range(lost):
                    accountant.step(noise_multiplier=method.noise_multiplier(), sample_rate=prep.sample_rate)
        else:
            batches.load_state_dict(resume["batches"])
        logged_keys = set(resume.get("logged_keys", []))
        evals = [dict(e) for e in resume["evals"]]
        if main:
            rundir.truncate_metrics(start - 1)
    if dist is not None:
        dist.broadcast_(params.values())
    if method.private:
        hooks = attach_hooks(model, mode, privacy.clip_norm)

    def save_checkpoint(step: int) -> None:
        ckpt.save(rundir.checkpoint, {
            "run_id": prep.spec.run_id, "step": step,
            "model": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "method": method.state_dict(),
            # the Poisson batches and the noise have no state here: they are (key, step) draws
            "batches": batches.state_dict() if not method.private else {},
            "rng": {"torch": torch.get_rng_state()},  # dropout etc.: non-private randomness
            "accountant_history": [list(h) for h in accountant.history] if accountant is not None else [],
            "data_fingerprint": data_fp, "noise": source.mode if source is not None else None,
            "logged_keys": sorted(logged_keys),
            "evals": evals,
            "wall_time_s": time.time() - t0 + (float(resume.get("wall_time_s", 0.0)) if resume else 0.0),
        })

    eval_steps = _eval_steps(cfg, prep.steps)
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
            chunks = _chunks(prep.train_enc, idx, pbs, device, cfg.engine.get("autocast"))
            if step == start:
                before = {n: _fingerprint(p) for n, p in params.items()}
            ts = time.perf_counter()
            if method.private:
                stats = dp_step(model=model, chunks=chunks, method=method, params=params, optimizer=optimizer,
                                noise_generator=source.for_step(step), mode=mode, hooks=hooks, step=step,
                                alignment=nonprivate_diag and bool(cfg.diagnostics.alignment),
                                per_layer=bool(cfg.diagnostics.per_layer), dist=dist)
                accountant.step(noise_multiplier=method.noise_multiplier(), sample_rate=prep.sample_rate)
            else:
                stats = nonprivate_step(model=model, chunks=chunks, params=params, optimizer=optimizer)
            schedule.step()
            step_time = time.perf_counter() - ts
            record = {"step": step, "lr": schedule.get_last_lr()[0]}
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
                record.update(_privacy_record(method, privacy, eps))
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
        if hooks is not None:
            hooks.cleanup()

    wall = time.time() - t0 + (float(resume.get("wall_time_s", 0.0)) if resume else 0.0)
    summary = _summary(cfg, prep, method, evals, primary, wall, accountant, source)
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


def _privacy_record(method, privacy, eps) -> dict:
    if privacy is None:
        return {"privacy/epsilon": float("inf")}
    return {"privacy/epsilon": eps, "privacy/sigma": method.noise_multiplier(), "privacy/clip_norm": privacy.clip_norm,
            "privacy/sample_rate": privacy.sample_rate}


def _summary(cfg, prep: Prepared, method, evals, primary, wall, accountant, source=None) -> dict:
    final = evals[-1] if evals else {}
    best = max((e[primary] for e in evals if e.get(primary) is not None), default=None)
    target = cfg.task.get("target")
    summary = {
        "run_id": prep.spec.run_id,
        "slug": prep.spec.slug,
        "method": method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "metric": primary,
        "final": final.get(primary),
        "best": best,
        "final_metrics": {k: v for k, v in final.items() if k != "step"},
        "target": target,
        "steps": prep.steps,
        "wall_time_s": wall,
    }
    for pct in (90, 95):
        summary[f"steps_to_{pct}"] = (steps_to(evals, primary, pct / 100 * float(target))
                                      if target is not None else None)
    summary["privacy"] = ledger(cfg, prep, method, accountant, source)
    summary["epsilon"] = summary["privacy"]["epsilon"]
    return summary


def ledger(cfg, prep: Prepared, method, accountant, source=None) -> dict:
    """Everything needed to re-derive the guarantee: σ, C, q, steps, sampling, accountant, δ, ε —
    and ε recomputed by an independent accountant (dp_accounting) — and the noise mode that says
    whether it is a guarantee (secure, entropy) or a simulation (seeded)."""
    if not method.private:
        return {"private": False, "epsilon": float("inf"), "sampling": "shuffle",
                "guarantee": "none: non-private training"}
    eps = acct.epsilon_of(accountant, prep.delta)
    history = [tuple(h) for h in accountant.history]
    try:
        eps_ind = acct.independent_epsilon(history, prep.delta, cfg.privacy.accountant)
    except Exception as e:  # never lose a finished run to the cross-check
        log.warning("independent accountant failed: %s", e)
        eps_ind = None
    disagree = None if eps_ind is None or eps == 0 else abs(eps - eps_ind) / eps
    return {
        "private": True,
        "epsilon": eps,
        "epsilon_target": None if cfg.privacy.noise_multiplier is not None else float(cfg.privacy.epsilon),
        "delta": prep.delta,
        "sigma": method.noise_multiplier(),
        "clip_norm": float(cfg.privacy.clip_norm),
        "sensitivity": method.sensitivity(),
        "sample_rate": prep.sample_rate,
        "expected_batch_size": prep.sample_rate * prep.public_n(),
        "dataset_size": prep.public_n(),
        "steps": sum(int(h[2]) for h in history),
        "sampling": "poisson",
        "accountant": cfg.privacy.accountant,
        "history": [list(h) for h in history],
        "epsilon_independent": eps_ind,
        "independent_accountant": "dp_accounting." + ("rdp" if cfg.privacy.accountant == "rdp" else "pld"),
        "accountants_disagree": None if disagree is None else bool(disagree > 0.01),
        "noise": source.mode if source is not None else None,
        "guarantee": noise.GUARANTEE[source.mode] if source is not None else None,
        "simulation": bool(source is not None and source.reproducible),
        "public": "N (dataset size), q = B/N, δ, σ, C and the step count are public; the noise key is not "
                  "(dpft/engine/noise.py)",
    }


def meta(prep: Prepared, status: str, **extra) -> dict:
    dev = prep.device
    return {
        "run_id": prep.spec.run_id,
        "slug": prep.spec.slug,
        "status": status,
        "versions": _versions(),
        "git_sha": _git_sha(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "pid": os.getpid(),
        "argv": sys.argv,
        "data_source": prep.data.source,
        "time_start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def config_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(spec.cfg, resolve=True)
