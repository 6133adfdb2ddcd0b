"""`dpft bench`: non-private and DP step paths measured side by side in one process.

Each path gets a fresh copy of the same model and the same fixed batch (B × L random token ids),
runs warm-up steps, then timed steps (CUDA-synchronised), and records the median step time and
the peak memory of the step: CUDA `max_memory_allocated` on GPU; on CPU the peak resident set
size above the pre-step baseline, sampled every millisecond from /proc (an approximation, stated
as such in the output). Ratios are to the non-private path. A path is ``nonprivate`` or
``<method>-hooks`` / ``<method>-ghost`` / ``<method>-bk`` (book-keeping; ``<method>`` alone = hooks), e.g. ``grape-hooks`` for
DP-GRAPE's projected per-sample gradients next to ``dpsgd-hooks`` (Opacus DP-Adam) and
``dpsgd-ghost`` (dpft's default DP path).
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from pathlib import Path

import torch

from dpft.engine.step import Batch, dp_step, nonprivate_step
from dpft.errors import DpftError
from dpft.methods import PrivacyParams, build_method


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
        _release_freed_memory()  # else a later path reuses the heap an earlier one grew and reads ~0
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


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the OS (glibc)
    except (OSError, AttributeError):
        pass


def _batch(b: int, length: int, vocab: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 30000), (b, length), generator=g)
    return Batch(ids.to(device), torch.ones(b, length, dtype=torch.long, device=device),
                 torch.randint(0, 2, (b,), generator=g).to(device))


def parse_path(path: str) -> tuple[str, str]:
    """`<method>-hooks|ghost|bk` or `<method>` (hooks) -> (method, mode); one-line error otherwise."""
    from dpft.config import GRAD_SAMPLE_MODES

    name, _, mode = path.rpartition("-")
    if not name:
        return path, "hooks"
    if mode not in GRAD_SAMPLE_MODES:
        raise DpftError(f"bench path '{path}': expected nonprivate, <method> or <method>-hooks|ghost|bk")
    return name, mode


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg, paths: list[str], batch_size: int, length: int, steps: int, warmup: int, device) -> dict:
    from dpft.engine.train import attach_hooks
    from dpft.models import apply_peft, load_classifier

    base = load_classifier(cfg.model, 2, int(cfg.seed)).to(device)
    base = apply_peft(base, cfg.model)
    vocab = int(base.config.vocab_size)
    pbs = int(cfg.runtime.physical_batch_size)
    batch = _batch(batch_size, length, vocab, device)
    autocast = cfg.engine.get("autocast")  # engine.autocast=bf16: every path's forward in bf16
    chunks = [Batch(batch.input_ids[i:i + pbs], batch.attention_mask[i:i + pbs], batch.labels[i:i + pbs],
                    autocast=autocast) for i in range(0, batch_size, pbs)]
    results = {}
    for path in paths:
        model = copy.deepcopy(base).train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        hooks = method = None
        if path != "nonprivate":
            name, mode = parse_path(path)
            mcfg = cfg if name == cfg.method.name else _with_method(cfg, name)
            method = build_method(mcfg)
            if not method.private:
                raise DpftError(f"bench path {path}: method {name} is not private")
            if mode in ("ghost", "bk") and not method.supports_ghost:
                continue
            if mode == "ghost" and autocast is not None:  # refused in training (dpft/config.py)
                continue
            model = method.prepare_model(model)  # as in training (e.g. grape's projected layers)
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            method.setup(model, params, PrivacyParams(sigma=1.0, clip_norm=float(cfg.privacy.clip_norm),
                                                      sample_rate=0.01, expected_batch_size=float(batch_size),
                                                      steps=steps + warmup, delta=1e-5))
            hooks = attach_hooks(model, mode, float(cfg.privacy.clip_norm))
            optimizer = method.build_optimizer(params, cfg.optim)
        else:
            from dpft.engine.optim import build_optimizer

            optimizer = build_optimizer(list(params.values()), cfg.optim)
        gen = torch.Generator(device=device).manual_seed(0)
        times, extras = [], []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            mem0 = torch.cuda.memory_allocated(device)
        rss = _RssPeak() if device.type == "cpu" else None
        if rss:
            rss.__enter__()
        try:
            for i in range(warmup + steps):
                _sync(device)
                t = time.perf_counter()
                if method is None:
                    nonprivate_step(model=model, chunks=chunks, params=params, optimizer=optimizer)
                else:
                    dp_step(model=model, chunks=chunks, method=method, params=params, optimizer=optimizer,
                            noise_generator=gen, mode=mode, hooks=hooks, step=i + 1, alignment=False)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                    if method is not None:
                        extras.append({k: v for k, v in method.diagnostics().items() if k.endswith("time_s")})
        finally:
            if rss:
                rss.__exit__(None, None, None)
            if hooks is not None:
                hooks.cleanup()
        peak = (torch.cuda.max_memory_allocated(device) - mem0 if device.type == "cuda" else rss.peak - rss.base)
        median = statistics.median(times)
        res = {"step_s": median, "peak_mem_bytes": int(peak), "steps": steps}
        for key in sorted({k for e in extras for k in e}):
            val = statistics.median(e.get(key, 0.0) for e in extras)
            res[key] = val
            res[f"{key}_frac"] = val / median
        results[path] = res
        del model, optimizer, params
    ref = results.get("nonprivate")
    if ref:
        for r in results.values():
            r["time_ratio"] = r["step_s"] / ref["step_s"]
            r["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"] if ref["peak_mem_bytes"] > 0 else None
    return {
        "model": cfg.model.name, "pretrained": bool(cfg.model.pretrained), "peft": cfg.model.get("peft"),
        "batch_size": batch_size, "length": length, "physical_batch_size": pbs, "optim": cfg.optim.name, "autocast": autocast,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "memory": "cuda max_memory_allocated above the pre-step baseline" if device.type == "cuda"
        else "CPU peak RSS above the pre-step baseline (sampled every 1 ms; approximate)",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "paths": results,
    }


def _with_method(cfg, name: str):
    from dpft.config import compose_run

    return compose_run([f"method={name}"]).cfg
