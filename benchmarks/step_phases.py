"""python benchmarks/step_phases.py [--model minilm] [--batch 64] [--length 64] [--rounds 6] [overrides ...]

Where a DP step's wall time goes (issue 23), by phase, without a profiler's overhead: the non-private
step and the default DP step (dpsgd, bk) are built side by side on the same model and batch as `dpft bench`
(dpft/bench.py), their steps interleaved (the first path alternating), and each phase timed with
perf_counter around the engine's own functions — forward (`per_sample_loss`), per-sample norms inside the
backward (`ClipHooks._capture`), the clipping factors, the clipped-sum contraction (`ClipHooks.clipped_sum`),
the noise (`StepNoise.gaussians`), autograd's backward without the norms, the optimizer, and the rest. Prints the
median of each over the rounds. On a shared machine read the DP step's phases against the non-private
step's, not against another run's.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import dpft.engine.step as st
    from dpft.bench import _build_path, fixed_batch
    from dpft.config import compose_run
    from dpft.engine import bookkeeping, noise
    from dpft.models import load_classifier

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, key: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(st, "per_sample_loss", "forward")
    timed(bookkeeping.ClipHooks, "_capture", "norms (in the backward)")
    timed(st, "_factors_bounded", "factors")
    timed(bookkeeping.ClipHooks, "clipped_sum", "clipped sum")
    timed(noise.StepNoise, "gaussians", "noise")
    timed(torch.Tensor, "backward", "backward")  # includes the norms: reported without them below
    for opt in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        timed(opt, "step", "optimizer")

    cfg = compose_run([f"model={args.model}", f"runtime.physical_batch_size={args.batch}", *args.overrides]).cfg
    base = load_classifier(cfg.model, 2, 0)
    chunks = fixed_batch(args.batch, args.length, int(base.config.vocab_size), args.batch, torch.device("cpu"))
    paths = ("nonprivate", "dpsgd-bk")
    built = {p: _build_path(base, cfg, p, chunks, args.batch, args.rounds + 1, torch.device("cpu")) for p in paths}
    for b in built.values():
        b.step(0)  # warm-up
    rows: dict[str, dict[str, list[float]]] = {p: collections.defaultdict(list) for p in paths}
    for r in range(1, args.rounds + 1):
        for p in paths if r % 2 else paths[::-1]:
            spent.clear()
            t = time.perf_counter()
            built[p].step(r)
            wall = time.perf_counter() - t
            rows[p]["step"].append(wall)
            norms = spent.get("norms (in the backward)", 0.0)
            if "backward" in spent:
                spent["backward"] -= norms  # the norms run inside autograd's backward: counted once
                spent["backward (without the norms)"] = spent.pop("backward")
            for k, v in spent.items():
                rows[p][k].append(v)
            rows[p]["rest"].append(wall - sum(spent.values()))
    for b in built.values():
        b.cleanup()
    print(f"# {args.model} B={args.batch} L={args.length} threads={torch.get_num_threads()} rounds={args.rounds} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  (median wall seconds)")
    for p in paths:
        print(f"{p:11s} " + "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in rows[p].items()))


if __name__ == "__main__":
    main()
