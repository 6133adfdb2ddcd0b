"""python benchmarks/bench_rounds.py [overrides ...] --batch 64 --length 64 --paths nonprivate,dpsgd-bk,opacus-ghost --rounds 3

`dpft bench` (dpft/bench.py) repeated in rounds, each round timing every path side by side on the same
model and batch; prints each round's ratios to non-private and their medians. On a machine shared with
other jobs the load drifts over minutes: ratios from one round are comparable, absolute times are not,
and the spread across rounds shows how far to trust them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--paths", default="nonprivate,dpsgd-bk,opacus-ghost")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every round's result here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1: CPU time = work)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dpft.bench import bench
    from dpft.config import compose_run

    cfg = compose_run(list(args.overrides)).cfg
    load = open("/proc/loadavg").read().split()[:3]
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"# {cpu} | torch threads {torch.get_num_threads()} | load {' '.join(load)} | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {' '.join(args.overrides)} B={args.batch} L={args.length} steps={args.steps} warmup={args.warmup}")
    rounds = []
    for r in range(args.rounds):
        out = bench(cfg, args.paths.split(","), args.batch, args.length, args.steps, args.warmup, torch.device("cpu"))
        rounds.append(out)
        print(f"round {r + 1}: " + "  ".join(
            f"{p} {v['step_s']:.2f}s wall {v['cpu_s']:.2f}s cpu {v.get('time_ratio', 0):.2f}x/"
            f"{(v.get('cpu_ratio') or 0):.2f}x/{(v.get('mem_ratio') or 0):.2f}x"
            for p, v in out["paths"].items()), flush=True)
    print("median over rounds (ratios to nonprivate: wall time / process CPU time / memory):")
    for p in rounds[0]["paths"]:
        med = lambda key: statistics.median((r["paths"][p].get(key) or 0) for r in rounds)  # noqa: E731
        print(f"  {p:14s} {med('step_s'):7.2f} s wall {med('cpu_s'):7.2f} s cpu   {med('time_ratio'):.3f}x wall   "
              f"{med('cpu_ratio'):.3f}x cpu   {med('mem_ratio'):.3f}x memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f, indent=1)


if __name__ == "__main__":
    main()
