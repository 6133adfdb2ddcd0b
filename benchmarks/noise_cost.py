"""Cost of the noise modes (privacy.noise) per optimizer step, side by side in one process.

    python benchmarks/noise_cost.py                     # MiniLM-L6 (the default job's model)
    python benchmarks/noise_cost.py model=roberta-base model.pretrained=false

Draws one step's noise for every trainable tensor of the model, as `dp_step` does, in each mode
(interleaved, median of --repeats), and prints ms per step and the ratio to `seeded` (one plain draw
per entry, the pre-hardening cost). With --step B it also times whole DP-SGD steps (ghost, batch B,
--length tokens, one step per mode per repeat, interleaved) and prints each mode's step time and
its ratio to the seeded step: the cost of the mode on the step, side by side in one process.
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
    ap.add_argument("--step", type=int, default=0, help="also time whole DP steps at this batch size")
    ap.add_argument("--length", type=int, default=64)
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
            step.gaussians([(s, 1.0) for s in shapes], "cpu")  # as dp_step draws them
            times[mode].append(time.perf_counter() - t)
    base = statistics.median(times["seeded"])
    print(f"{cfg.model.name}: {n / 1e6:.1f} M noised entries per step, torch threads {torch.get_num_threads()}")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"  {mode:8s} {1e3 * med:8.1f} ms/step   ×{med / base:.2f} vs seeded")
    if args.step:
        step_times(cfg, model, args.step, args.length, args.repeats)


def step_times(cfg, model, b: int, length: int, repeats: int) -> None:
    from dpft.bench import _with_mode, fixed_batch
    from dpft.engine.noise import MODES, NoiseSource
    from dpft.engine.stepper import Stepper
    from dpft.methods import PrivacyParams, build_method

    cfg = _with_mode(cfg, "ghost")
    dp = Stepper(model, build_method(cfg), cfg, steps=100,
                 privacy=PrivacyParams(sigma=1.0, clip_norm=1.0, sample_rate=0.01, expected_batch_size=float(b),
                                       steps=100, delta=1e-5)).attach()
    chunks = fixed_batch(b, length, int(model.config.vocab_size), 64, "cpu")
    times = {m: [] for m in MODES}
    for r in range(repeats + 1):
        for mode in MODES:
            noise = NoiseSource.create(mode, 0, "bench").for_step(r + 1)
            t = time.perf_counter()
            dp.step(chunks, r + 1, noise=noise)
            if r:  # the first round warms up
                times[mode].append(time.perf_counter() - t)
    dp.close()
    base = statistics.median(times["seeded"])
    print(f"DP-SGD ghost step, B={b}, L={length} (median of {repeats}):")
    for mode in MODES:
        med = statistics.median(times[mode])
        print(f"  {mode:8s} {med:8.2f} s/step   ×{med / base:.2f} vs seeded")


if __name__ == "__main__":
    main()
