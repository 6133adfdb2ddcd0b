"""`dpft bench`: non-private and DP step paths measured side by side in one process.

Each path gets a fresh copy of the same model and the same fixed batch (B × L random token ids),
runs warm-up steps, then timed steps (CUDA-synchronised), and records the median step time and
the peak memory of the step: CUDA `max_memory_allocated` on GPU; on CPU the peak resident set
size above the pre-step baseline, sampled every millisecond from /proc (an approximation, stated
as such in the output). Ratios are to the non-private path. A path is ``nonprivate`` or
``<method>-hooks`` / ``<method>-ghost`` / ``<method>-bk`` (book-keeping; ``<method>`` alone = hooks), e.g. ``grape-hooks`` for
DP-GRAPE's projected per-sample gradients next to ``dpsgd-hooks`` (Opacus DP-Adam) and
``dpsgd-bk`` (dpft's default DP path). Each path also reports the process CPU time of its steps
(``cpu_s``, ``cpu_ratio``): on a machine shared with other jobs it tracks a path's work far better
than wall time (benchmarks/cpu_steps.py measures it with one thread, round-robin).

``opacus-hooks`` and ``opacus-ghost`` are the comparator: Opacus' own DP-SGD exactly as a user builds
it (``PrivacyEngine.make_private``; ghost with its ``DPLossFastGradientClipping`` two-backward loss;
micro-batches through ``signal_skip_step`` as Opacus' BatchMemoryManager does), not dpft's engine, so
dpft's paths and Opacus' are measured on the same model, batch and device in one process.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dpft.config import grad_sample_refusal
from dpft.engine.batches import Encoded, chunks
from dpft.engine.memory import release_freed_memory, retain_freed_memory
from dpft.engine.noise import NoiseSource
from dpft.engine.step import Batch
from dpft.engine.stepper import Stepper
from dpft.errors import DpftError
from dpft.methods import NonPrivate, PrivacyParams, build_method


class _RssPeak:
    """Peak RSS (bytes) of this process while active, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = 4096

    def _rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self._page
        except OSError:
            return 0

    def __enter__(self):
        release_freed_memory()
        self.base = self._rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


OPACUS_PATHS = {"opacus-hooks": "hooks", "opacus-ghost": "ghost"}


def parse_path(path: str) -> tuple[str, str]:
    """`<method>-hooks|ghost|bk` or `<method>` (hooks) -> (method, mode); one-line error otherwise."""
    from dpft.config import GRAD_SAMPLE_MODES

    if path in OPACUS_PATHS:
        return "opacus", OPACUS_PATHS[path]
    if path.startswith("opacus-"):
        raise DpftError(f"bench path '{path}': Opacus' own paths are {', '.join(OPACUS_PATHS)}")
    name, _, mode = path.rpartition("-")
    if not name:
        return path, "hooks"
    if mode not in GRAD_SAMPLE_MODES:
        raise DpftError(f"bench path '{path}': expected nonprivate, <method> or <method>-hooks|ghost|bk")
    return name, mode


def opacus_reference(model, mode: str, clip_norm: float, optimizer, batch_size: int, chunks: list[Batch],
                     noise_multiplier: float = 1.0, explicit_ids: bool = True):
    """Opacus' DP-SGD as its users write it -> (wrapped model, wrapped optimizer, step function).
    A fixed (non-Poisson) batch of `batch_size`, noise σ = `noise_multiplier`, clip norm C: the
    bench's comparator, and in tests an independent implementation of dpft's clipped sum.
    `explicit_ids=False` lets the model build its own position/token-type ids, as
    `model(input_ids, attention_mask)` does (benchmarks/opacus_own_ids.py)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from dpft.models import model_inputs

    hf = model
    loader = DataLoader(TensorDataset(torch.zeros(batch_size)), batch_size=batch_size)
    with warnings.catch_warnings():  # "secure RNG turned off": Opacus' default, as its users run it
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    made = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm, poisson_sampling=False, grad_sample_mode=mode,
        criterion=torch.nn.CrossEntropyLoss())
    model, optimizer = made[0], made[1]
    criterion = made[2] if mode == "ghost" else torch.nn.CrossEntropyLoss()

    def step() -> None:
        for k, c in enumerate(chunks):  # Opacus' BatchMemoryManager: clip and accumulate, step on the last
            optimizer.signal_skip_step(do_skip=k < len(chunks) - 1)
            # explicit per-example position/token-type ids, as Opacus needs with HF models (models.model_inputs)
            inputs = (model_inputs(hf, c.input_ids, c.attention_mask) if explicit_ids
                      else {"input_ids": c.input_ids, "attention_mask": c.attention_mask})
            logits = model(**inputs).logits
            criterion(logits, c.labels).backward()  # ghost: DPTensorFastGradientClipping, two backwards
            optimizer.step()
            optimizer.zero_grad()

    return model, optimizer, step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Path:
    """One bench path built on a fresh copy of the model: `step(i)` runs optimizer step i."""

    model: torch.nn.Module
    step: Callable[[int], None]
    method: object = None
    cleanup: Callable[[], None] = lambda: None


def _build_path(base, cfg, path: str, chunks: list[Batch], batch_size: int, total_steps: int, device) -> _Path | None:
    """The path's model and step function, built by training's own `Stepper`; None for a
    combination training refuses (`dpft.config.grad_sample_refusal`: ghost/bk for a
    norm-dependent-only method, half precision with ghost)."""
    from dpft.optim import build_optimizer

    autocast = cfg.engine.get("autocast")
    model = copy.deepcopy(base).train()
    if path in OPACUS_PATHS:
        if autocast is not None:  # Opacus' grad samplers are not run under autocast here
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        model, optimizer, opacus = opacus_reference(model, OPACUS_PATHS[path], float(cfg.privacy.clip_norm),
                                                    build_optimizer(params, cfg.optim), batch_size, chunks)
        return _Path(model, lambda i: opacus(), cleanup=model._close)  # _close: remove Opacus' hooks
    if path == "nonprivate":
        method, mode = NonPrivate(cfg), "hooks"
    else:
        name, mode = parse_path(path)
        method = build_method(cfg if name == cfg.method.name else _with_method(cfg, name))
        if not method.private:
            raise DpftError(f"bench path {path}: method {name} is not private")
    cfg = _with_mode(cfg, mode)
    if method.private and grad_sample_refusal(cfg, method):
        return None  # refused in training too
    privacy = (PrivacyParams(sigma=1.0, clip_norm=float(cfg.privacy.clip_norm), sample_rate=0.01,
                             expected_batch_size=float(batch_size), steps=total_steps, delta=1e-5)
               if method.private else None)
    # the configured privacy.noise: the default secure mode's float guard is part of the step's cost
    noise = (NoiseSource.create(str(cfg.privacy.get("noise", "secure")), int(cfg.seed), "bench")
             if method.private else None)
    stepper = Stepper(model, method, cfg, privacy=privacy, steps=total_steps, noise=noise).attach()
    return _Path(stepper.model, lambda i: stepper.step(chunks, i + 1), method=method if method.private else None,
                 cleanup=stepper.close)


def fixed_batch(b: int, length: int, vocab: int, pbs: int, device, autocast=None, seed: int = 0) -> list[Batch]:
    """A fixed logical batch of b random token sequences of `length` (random labels), split into
    training's micro-batches of `pbs` (`dpft.engine.batches.chunks`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 30000), (b, length), generator=g)
    enc = Encoded(ids, torch.ones(b, length, dtype=torch.long), torch.randint(0, 2, (b,), generator=g))
    return chunks(enc, list(range(b)), pbs, device, autocast)


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int | None:
    """Largest b ≤ limit with fits(b), for a fits() that is monotone in b (memory grows with b):
    double from `start` until it fails or reaches `limit`, then bisect. None if 1 does not fit."""
    lo, hi = 0, None  # lo: largest known to fit; hi: smallest known not to
    b = max(1, min(start, limit))
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return b
            b = min(2 * b, limit)
        else:
            hi = b
    if lo == 0:  # the start failed: bisect below it
        if hi == 1 or not fits(1):
            return None
        lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fits(base, cfg, path: str, b: int, length: int, vocab: int, device) -> bool:
    """Does one optimizer step of `path` at physical batch b fit in the device's memory?"""
    built = None
    try:
        chunks = fixed_batch(b, length, vocab, b, device, cfg.engine.get("autocast"))
        built = _build_path(base, cfg, path, chunks, b, 1, device)
        if built is None:
            return False
        built.step(0)
        _sync(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        if built is not None:
            built.cleanup()
        del built
        release_freed_memory()
        torch.cuda.empty_cache()


def bench(cfg, paths: list[str], batch_size: int, length: int, steps: int, warmup: int, device,
          max_batch: int | None = None, interleave: bool = False) -> dict:
    """Median step time and peak memory of each path at (batch_size, length), side by side; with
    `max_batch` (CUDA only) also the largest physical batch ≤ max_batch whose step fits.

    By default each path runs all its steps before the next path is built. With `interleave` every
    path is built first and the steps go round-robin (step i of every path, the first path rotating
    each round), so a machine whose speed drifts over minutes slows every path alike; the time and
    CPU ratios are then the medians of the per-round ratios (each path paired with the non-private
    step of its own round), and every path's model stays in memory at once."""
    from dpft.models import apply_peft, load_classifier

    retain_freed_memory()  # as training's Stepper sets it, before any path (Opacus' too) is built
    if max_batch is not None and device.type != "cuda":
        raise DpftError("--max-batch needs a CUDA device (on the CPU running out of memory kills the process)")
    base = load_classifier(cfg.model, 2, int(cfg.seed)).to(device)
    base = apply_peft(base, cfg.model)
    vocab = int(base.config.vocab_size)
    pbs = int(cfg.runtime.physical_batch_size)
    autocast = cfg.engine.get("autocast")  # engine.autocast=bf16: every path's forward in bf16
    chunks = fixed_batch(batch_size, length, vocab, pbs, device, autocast)
    runs = (_interleaved if interleave else _sequential)(base, cfg, paths, chunks, batch_size, steps, warmup, device)
    results = {}
    for path, r in runs.items():
        median = statistics.median(r.times)
        # process CPU time (all threads): on a machine shared with other jobs it tracks the work a path
        # does far better than wall time, which includes time the process waited for a core
        res = {"step_s": median, "cpu_s": statistics.median(r.cpu), "peak_mem_bytes": int(r.peak), "steps": steps}
        for key in sorted({k for e in r.extras for k in e}):
            val = statistics.median(e.get(key, 0.0) for e in r.extras)
            res[key] = val
            res[f"{key}_frac"] = val / median
        if max_batch is not None:
            res["max_batch"] = largest_batch(lambda b, path=path: _fits(base, cfg, path, b, length, vocab, device),
                                             start=batch_size, limit=max_batch)
        results[path] = res
    ref = runs.get("nonprivate")
    if ref:
        for path, r in results.items():
            mine = runs[path]
            if interleave:  # paired by round: the drift between rounds cancels
                r["time_ratio"] = statistics.median(a / b for a, b in zip(mine.times, ref.times))
                r["cpu_ratio"] = (statistics.median(a / b for a, b in zip(mine.cpu, ref.cpu))
                                  if min(ref.cpu) > 0 else None)
            else:
                r["time_ratio"] = r["step_s"] / results["nonprivate"]["step_s"]
                r["cpu_ratio"] = r["cpu_s"] / results["nonprivate"]["cpu_s"] if results["nonprivate"]["cpu_s"] > 0 else None
            r["mem_ratio"] = r["peak_mem_bytes"] / ref.peak if ref.peak > 0 else None
    return {
        "model": cfg.model.name, "pretrained": bool(cfg.model.pretrained), "peft": cfg.model.get("peft"),
        "batch_size": batch_size, "length": length, "physical_batch_size": pbs, "optim": cfg.optim.name, "autocast": autocast,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "memory": ("cuda max_memory_allocated above the pre-step baseline" if device.type == "cuda"
                   else "CPU peak RSS above the pre-step baseline (sampled every 1 ms; approximate)"),
        "schedule": ("interleaved: steps round-robin over the paths, ratios = median of per-round ratios"
                     if interleave else "sequential: each path's steps in turn, ratios of medians"),
        "max_batch_limit": max_batch,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "paths": results,
    }


class _PeakMemory:
    """Peak memory of the block above the baseline at its start (`.bytes` after it): CUDA
    `max_memory_allocated`, CPU peak RSS (`_RssPeak`), 0 on other devices."""

    def __init__(self, device):
        self.device, self.bytes, self._rss = device, 0, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._rss = _RssPeak().__enter__()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._rss is not None:
            self._rss.__exit__(*exc)
            self.bytes = self._rss.peak - self._rss.base


@dataclass
class _Timings:
    """One path's timed steps (wall, process CPU, the method's own timings) and peak memory."""

    times: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    extras: list = field(default_factory=list)
    peak: int = 0

    def step(self, built: _Path, i: int, device, counted: bool = True) -> None:
        """Run step i of `built`; record it unless it is a warm-up."""
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        built.step(i)
        _sync(device)
        if counted:
            self.times.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
            if built.method is not None:
                self.extras.append({k: v for k, v in built.method.diagnostics().items() if k.endswith("time_s")})


def _sequential(base, cfg, paths, chunks, batch_size, steps, warmup, device) -> dict[str, _Timings]:
    """Each path built, stepped warmup + steps times and freed before the next; memory is the peak
    over its steps above the baseline before its first step."""
    runs = {}
    for path in paths:
        built = _build_path(base, cfg, path, chunks, batch_size, steps + warmup, device)
        if built is None:
            continue
        r = runs[path] = _Timings()
        try:
            with _PeakMemory(device) as mem:
                for i in range(warmup + steps):
                    r.step(built, i, device, counted=i >= warmup)
            r.peak = mem.bytes
        finally:
            built.cleanup()
        del built
    return runs


def _interleaved(base, cfg, paths, chunks, batch_size, steps, warmup, device) -> dict[str, _Timings]:
    """Every path built and given its warm-up steps in turn (its memory is measured there, from the
    baseline before its first step, as in the sequential schedule: the earlier paths sit idle at
    their steady state meanwhile), then timed step i of each path in turn, the first path rotating
    with i. `warmup` ≥ 2 so that the memory covers a step taken with the optimizer's state."""
    if warmup < 2:
        raise DpftError("--interleave needs --warmup >= 2 (each path's memory is measured over its warm-up steps)")
    built, runs = {}, {}
    try:
        for path in paths:
            b = _build_path(base, cfg, path, chunks, batch_size, steps + warmup, device)
            if b is None:
                continue
            built[path] = b
            r = runs[path] = _Timings()
            with _PeakMemory(device) as mem:
                for i in range(warmup):
                    r.step(b, i, device, counted=False)
            r.peak = mem.bytes
        order = list(built)
        for i in range(warmup, warmup + steps):
            k = (i - warmup) % len(order) if order else 0
            for path in order[k:] + order[:k]:
                runs[path].step(built[path], i, device)
        return runs
    finally:
        for b in built.values():
            b.cleanup()


def _with_method(cfg, name: str):
    from dpft.config import compose_run

    return compose_run([f"method={name}"]).cfg


def _with_mode(cfg, mode: str):
    """`cfg` with engine.grad_sample_mode = the path's mode (a copy; the bench's own config is kept)."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.update(cfg, "engine.grad_sample_mode", mode)
    OmegaConf.set_readonly(cfg, True)
    return cfg
