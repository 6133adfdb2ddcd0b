"""python benchmarks/profile_step.py [--model minilm] [--batch 64] [--length 64] [--paths nonprivate,dpsgd-bk,...]

Where a DP step's time goes (issue 23), from torch.profiler over one step per path after a warm-up,
side by side in one process on the same model and batch as `dpft bench` (dpft/bench.py builds the
paths). Rows: the step's wall time, then CPU time (self, summed over threads' ops) in dpft's own
regions — per-sample norms by layer kind (`dpft::norms::Linear` ...: Gram products in float64, bounds),
the clipped-sum contraction (`dpft::clipped_sum`) — and in the big aten kernels (matmuls, float64 work,
copies) outside them. Timings are noisy on a shared machine: read the ratios within one run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--paths", default="nonprivate,dpsgd-bk,dpsgd-ghost")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    from dpft.bench import _build_path, fixed_batch
    from dpft.config import compose_run
    from dpft.models import load_classifier

    over = [f"model={args.model}", f"runtime.physical_batch_size={args.batch}"]
    if args.pretrained is not None:
        over.append(f"model.pretrained={args.pretrained}")
    cfg = compose_run(over).cfg
    base = load_classifier(cfg.model, 2, 0)
    chunks = fixed_batch(args.batch, args.length, int(base.config.vocab_size), args.batch, torch.device("cpu"))
    print(f"# {args.model} B={args.batch} L={args.length} threads={torch.get_num_threads()} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for path in args.paths.split(","):
        built = _build_path(base, cfg, path, chunks, args.batch, 3, torch.device("cpu"))
        built.step(0)  # warm-up
        t = time.perf_counter()
        built.step(1)
        plain = time.perf_counter() - t
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            built.step(2)
            wall = time.perf_counter() - t
        built.cleanup()
        events = prof.key_averages()
        regions = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("dpft::")}
        ops = defaultdict(float)
        for e in events:
            if e.key.startswith("aten::"):
                ops[e.key] += e.self_cpu_time_total / 1e6
        print(f"\n## {path}: step {plain:.3f} s unprofiled, {wall:.3f} s profiled")
        for k, v in sorted(regions.items(), key=lambda kv: -kv[1]):
            print(f"  region {k:34s} {v:7.3f} s  {100 * v / wall:5.1f} % of the step")
        for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  op     {k:34s} {v:7.3f} s  {100 * v / wall:5.1f} %")


if __name__ == "__main__":
    main()
