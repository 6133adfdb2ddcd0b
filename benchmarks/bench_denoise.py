"""Benchmark of method=denoise's spectral work: full-SVD reference vs the fast exact path.

    python benchmarks/bench_denoise.py                       # MiniLM, roberta-base, roberta-large
    python benchmarks/bench_denoise.py --models minilm --step  # + a real MiniLM DP step for the fraction
    python benchmarks/bench_denoise.py --device cuda

For every linear weight of a model (its real shapes; a meta-device skeleton, no weights), builds a
noised gradient Y = X + W, W ~ N(0, s²) with s = σC/B, and times

* reference: ``torch.linalg.svd`` of every matrix, one by one, then the same shrinkage
  (``denoise_matrix(fast=False)``);
* fast: ``Denoise.postprocess`` exactly as training calls it (batched by shape, Lanczos threshold
  test, block Krylov with rank doubling, exact fallback);

and prints both times, their ratio and the largest relative error ‖fast − ref‖/‖ref‖ over layers.
The problem is scale-invariant (only X/s matters), so s is a realistic value and nothing more.

Signal scenarios (X per layer: rank 8, singular values θ·0.6^i, θ relative to the BBP
detection point s(nm)^¼, below which a signal is invisible):

* noise  — θ = 0: DP fine-tuning's common case at small batches; every layer should be skipped;
* mixed  — θ log-uniform in [0.3, 4]× the detection point: some layers skipped, some denoised;
* signal — θ in [2, 4]× the detection point: every layer denoised (the worst case for speed).

A reference run on large models takes minutes on a CPU: ``--ref-sample K`` times the reference on
K matrices per shape and extrapolates (the errors are then over those K). This is a script, not a
test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from dpft.methods import PrivacyParams, build_method
from dpft.methods.denoise import denoise_matrix

# (layers, hidden, intermediate, head hidden→hidden dense?) and the DP setting that sets s = σC/B
MODELS = {
    "minilm": dict(layers=6, hidden=384, inter=1536, pooler=True, sigma=0.6, clip=1.0, batch=64),
    "roberta-base": dict(layers=12, hidden=768, inter=3072, pooler=False, sigma=0.6, clip=0.1, batch=1000),
    "roberta-large": dict(layers=24, hidden=1024, inter=4096, pooler=False, sigma=0.6, clip=0.1, batch=1000),
}
SCENARIOS = ("noise", "mixed", "signal")


class Skeleton(nn.Module):
    """The linear weights of a BERT/RoBERTa classifier on the meta device (shapes only)."""

    def __init__(self, layers: int, hidden: int, inter: int, pooler: bool, labels: int = 2):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False, device="meta")  # noqa: E731
        self.layer = nn.ModuleList(
            nn.ModuleDict({"query": lin(hidden, hidden), "key": lin(hidden, hidden), "value": lin(hidden, hidden),
                           "attn_out": lin(hidden, hidden), "intermediate": lin(hidden, inter),
                           "output": lin(inter, hidden)})
            for _ in range(layers))
        # BERT: pooler + classifier; RoBERTa: classifier.dense + classifier.out_proj
        self.head_dense = lin(hidden, hidden)
        self.head_out = lin(hidden, labels)


def noised_gradients(shapes: dict[str, tuple[int, int]], s: float, scenario: str, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, m) in shapes.items():
        Y = s * torch.randn(n, m, generator=g)
        if scenario != "noise":
            lo, hi = (0.3, 4.0) if scenario == "mixed" else (2.0, 4.0)
            u = float(torch.rand(1, generator=g))
            theta = s * (n * m) ** 0.25 * math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            r = min(8, n, m)
            U = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
            V = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
            Y += U @ torch.diag(theta * 0.6 ** torch.arange(r, dtype=torch.float32)) @ V.T
        out[name] = Y.to(device)
    return out


def method_for(model: nn.Module, spec: dict, fast_cfg: dict):
    conf = OmegaConf.load(__import__("dpft").__path__[0] + "/conf/method/denoise.yaml")
    method = build_method(OmegaConf.create({"method": OmegaConf.merge(conf, fast_cfg), "seed": 0}))
    params = dict(model.named_parameters())
    method.setup(model, params, PrivacyParams(sigma=spec["sigma"], clip_norm=spec["clip"], sample_rate=0.01,
                                              expected_batch_size=float(spec["batch"]), steps=100, delta=1e-5))
    return method


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, scenario: str, device, repeats: int, ref_sample: int, kappa: float) -> dict:
    spec = MODELS[name]
    model = Skeleton(spec["layers"], spec["hidden"], spec["inter"], spec["pooler"])
    method = method_for(model, spec, {"kappa": kappa})
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    s = spec["sigma"] * spec["clip"] / spec["batch"]
    grads = noised_gradients(shapes, s, scenario, device, seed=0)
    stds = {n: s for n in grads}

    times = []
    for i in range(repeats + 1):  # the first call warms up allocators and LAPACK workspaces
        sync(device)
        t = time.perf_counter()
        out = method.postprocess(grads, stds, step=i + 1)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    diag = method.diagnostics()
    fast_t = statistics.median(times)

    by_shape: dict[tuple, list[str]] = {}
    for n in method.targets:
        by_shape.setdefault(shapes[n], []).append(n)
    ref_t, err, timed = 0.0, 0.0, 0
    for shape, names in by_shape.items():
        chosen = names if ref_sample <= 0 else names[:ref_sample]
        t_shape = 0.0
        for n in chosen:
            sync(device)
            t = time.perf_counter()
            ref = denoise_matrix(grads[n], s, kappa, fast=False)
            sync(device)
            t_shape += time.perf_counter() - t
            err = max(err, float((out[n].double() - ref.double()).norm() / ref.double().norm()))
        ref_t += t_shape * len(names) / len(chosen)
        timed += len(chosen)
    return {
        "model": name, "scenario": scenario, "layers": len(method.targets), "ref_timed": timed,
        "ref_s": ref_t, "fast_s": fast_t, "ratio": ref_t / fast_t, "max_rel_err": err,
        "denoised": int(diag["layers_denoised"]), "rank_mean": diag["rank_mean"], "rank_max": int(diag["rank_max"]),
        "exact": int(diag["exact_decompositions"]), "failures": int(diag["svd_failures"]),
        "top_over_edge_max": diag["top_over_edge_max"],
    }


def dp_step_fraction(device, batch: int, length: int, steps: int) -> dict:
    """A real MiniLM DP step (dpft.bench: same batch, warm-up, median), with and without denoise."""
    from dpft.bench import bench
    from dpft.config import compose_run

    cfg = compose_run(["method=denoise", "model=minilm", f"runtime.physical_batch_size={batch}"]).cfg
    res = bench(cfg, ["dpsgd-ghost", "denoise-ghost"], batch, length, steps, 1, device)
    return {k: res["paths"][k] for k in ("dpsgd-ghost", "denoise-ghost")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-sample", type=int, default=0, help="reference on K matrices per shape (0 = all)")
    ap.add_argument("--kappa", type=float, default=1.02)
    ap.add_argument("--step", action="store_true", help="also time a real MiniLM DP step (B=64, L=48)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'model':14} {'scenario':8} {'layers':>6} {'denoised':>8} {'rank mean/max':>13} {'exact':>5} "
          f"{'ref s':>8} {'fast s':>8} {'ratio':>7} {'max rel err':>11}")
    rows = []
    for name in args.models:
        for sc in args.scenarios:
            r = bench_model(name, sc, device, args.repeats, args.ref_sample, args.kappa)
            rows.append(r)
            print(f"{r['model']:14} {r['scenario']:8} {r['layers']:6d} {r['denoised']:8d} "
                  f"{r['rank_mean']:8.2f}/{r['rank_max']:<4d} {r['exact']:5d} {r['ref_s']:8.3f} {r['fast_s']:8.3f} "
                  f"{r['ratio']:7.1f} {r['max_rel_err']:11.1e}"
                  + ("" if r["ref_timed"] == r["layers"] else f"  (reference on {r['ref_timed']} matrices, scaled)"),
                  flush=True)
    out = {"rows": rows}
    if args.step:
        st = dp_step_fraction(device, 64, 48, 3)
        base, dn = st["dpsgd-ghost"], st["denoise-ghost"]
        print(f"MiniLM DP step (B=64, L=48, ghost): dpsgd {base['step_s']:.3f} s, denoise {dn['step_s']:.3f} s; "
              f"denoise_time_s {dn.get('denoise_time_s', float('nan')):.4f} s = "
              f"{100 * dn.get('denoise_time_s_frac', float('nan')):.2f}% of the step")
        out["step"] = st
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
