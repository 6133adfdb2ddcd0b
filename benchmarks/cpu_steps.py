"""python benchmarks/cpu_steps.py [overrides ...] --batch 64 --length 64 --paths nonprivate,dpsgd-bk --rounds 2

Process CPU time (time.process_time, one torch thread) per optimizer step of each path, round-robin over
the paths so load drift hits all of them alike, built with `dpft.bench._build_path` from whichever dpft is
on PYTHONPATH — so the same command measures two versions of the engine (e.g. before/after a change:
`PYTHONPATH=/tmp/old python benchmarks/cpu_steps.py ...`). On a machine shared with other jobs, one
thread's CPU time tracks the work a step does much better than wall time; ratios to non-private are the
figures to compare across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--paths", default="nonprivate,dpsgd-bk")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import dpft
    from dpft.bench import _build_path, fixed_batch
    from dpft.config import compose_run
    from dpft.models import load_classifier

    cfg = compose_run([*args.overrides, f"runtime.physical_batch_size={args.batch}"]).cfg
    base = load_classifier(cfg.model, 2, 0)
    chunks = fixed_batch(args.batch, args.length, int(base.config.vocab_size), args.batch, torch.device("cpu"))
    paths = args.paths.split(",")
    built = {p: _build_path(base, cfg, p, chunks, args.batch, 2 + args.rounds, torch.device("cpu")) for p in paths}
    for b in built.values():
        b.step(0)  # warm-up
    cpu = {p: [] for p in paths}
    for r in range(args.rounds):
        for p in paths:
            c = time.process_time()
            built[p].step(r + 1)
            cpu[p].append(time.process_time() - c)
    print(f"# {dpft.__file__} | {' '.join(args.overrides)} B={args.batch} L={args.length} | "
          f"load {' '.join(open('/proc/loadavg').read().split()[:3])} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    ref = statistics.median(cpu[paths[0]])
    for p in paths:
        m = statistics.median(cpu[p])
        print(f"  {p:14s} {m:7.2f} s cpu  {m / ref:.3f}x {paths[0]}   rounds: " + " ".join(f"{x:.2f}" for x in cpu[p]))


if __name__ == "__main__":
    main()
