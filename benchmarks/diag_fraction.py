"""python benchmarks/diag_fraction.py [--batches 256 1024] [--step-batch 64] [--length 64]

What the alignment diagnostics (`diagnostics.alignment`: cos(noised, clipped), cos(processed, clipped))
and the denoiser (`method=denoise`'s postprocess) add to a DP step, as fractions of the step at B = 256
and 1024 (issue 23), MiniLM-L6. Both are fixed costs per step (passes over the parameter-sized tensors;
the denoiser's spectral tests) that do not depend on B, so they are timed directly on MiniLM's real
parameter shapes (noise-only gradients: the common case at DP noise levels), while the step is one
measured bk step at `--step-batch` scaled linearly in B (the per-example work; the fixed parts of the
step make the real step at large B slightly cheaper per example, so the fractions are upper bounds).
One torch thread, process CPU time (robust to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _cpu(fn, repeats=3) -> float:
    out = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        out.append(time.process_time() - c)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--step-batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from dpft.bench import _build_path, fixed_batch
    from dpft.config import compose_run
    from dpft.engine.step import _alignment
    from dpft.methods import PrivacyParams, build_method
    from dpft.models import load_classifier

    cfg = compose_run([f"runtime.physical_batch_size={args.step_batch}"]).cfg
    base = load_classifier(cfg.model, 2, 0)
    chunks = fixed_batch(args.step_batch, args.length, int(base.config.vocab_size), args.step_batch, torch.device("cpu"))
    built = _build_path(base, cfg, "dpsgd-bk", chunks, args.step_batch, 4, torch.device("cpu"))
    built.step(0)
    step = _cpu(lambda: built.step(1), repeats=2)
    built.cleanup()
    per_example = step / args.step_batch

    params = {n: p for n, p in base.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    clipped = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    noised = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    processed = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    align_same = _cpu(lambda: _alignment(clipped, noised, noised, 256.0, False))  # dpsgd: processed is noised
    align_diff = _cpu(lambda: _alignment(clipped, noised, processed, 256.0, False))  # a post-processing method

    results = {}
    for b in args.batches:
        dcfg = compose_run(["method=denoise"]).cfg
        method = build_method(dcfg)
        method.setup(base, params, PrivacyParams(sigma=0.47, clip_norm=1.0, sample_rate=b / 20000,
                                                 expected_batch_size=float(b), steps=30, delta=1e-5))
        s = 0.47 / b
        grads = {n: torch.randn(p.shape, generator=g) * s for n, p in params.items()}
        std = {n: s for n in params}
        results[b] = _cpu(lambda: method.postprocess(grads, std, 5))

    print(f"# MiniLM-L6, L={args.length}, 1 thread, process CPU time, "
          f"load {' '.join(open('/proc/loadavg').read().split()[:3])}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# bk DP step at B={args.step_batch}: {step:.2f} s ({1e3 * per_example:.1f} ms per example)")
    print(f"# alignment pass: {align_same:.3f} s (processed is the noised gradient), {align_diff:.3f} s (post-processed)")
    print("| B | DP step (scaled) | alignment | share | alignment (post-processed) | share | denoiser | share |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        st = per_example * b
        print(f"| {b} | {st:.1f} s | {align_same:.3f} s | {100 * align_same / st:.2f} % | {align_diff:.3f} s | "
              f"{100 * align_diff / st:.2f} % | {results[b]:.3f} s | {100 * results[b] / st:.2f} % |")


if __name__ == "__main__":
    main()
