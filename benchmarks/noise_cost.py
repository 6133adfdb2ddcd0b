"""Cost of the noise modes (privacy.noise) per optimizer step, side by side in one process.

    python benchmarks/noise_cost.py                     # MiniLM-L6 (the default job's model)
    python benchmarks/noise_cost.py model=roberta-base model.pretrained=false

Draws one step's noise for every trainable tensor of the model, as `dp_step` does, in each mode
(interleaved, median of --repeats), and prints ms per step and the ratio to `seeded` (one plain draw
per entry, the pre-hardening cost). Compare with the step time of `dpft bench` or a run's
`train/step_time` to get the fraction of a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dpft.config import compose_run
    from dpft.engine.noise import MODES, NoiseSource
    from dpft.models import load_classifier

    cfg = compose_run(list(args.overrides)).cfg
    model = load_classifier(cfg.model, 2, 0)
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    times = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            step = NoiseSource.create(mode, 0, "bench").for_step(r + 1)
            t = time.perf_counter()
            for s in shapes:
                step.gaussian(s, 1.0, "cpu")
            times[mode].append(time.perf_counter() - t)
    base = statistics.median(times["seeded"])
    print(f"{cfg.model.name}: {n / 1e6:.1f} M noised entries per step, torch threads {torch.get_num_threads()}")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"  {mode:8s} {1e3 * med:8.1f} ms/step   ×{med / base:.2f} vs seeded")


if __name__ == "__main__":
    main()
