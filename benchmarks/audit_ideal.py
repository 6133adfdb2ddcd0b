"""What an ideal one-run auditor of the debug=audit preset could prove: the ceiling of `dpft audit`.

    python benchmarks/audit_ideal.py                  # m = 1000 and 5000, claim ε = 2, noise ×1 and ×½
    python benchmarks/audit_ideal.py --m 1000 --trials 20
    python benchmarks/audit_ideal.py --m 5000 --batch-size 2625 --noise 1   # q = 0.5

Simulates the mechanism the ledger describes, exactly: each of m canaries in with a fair coin; at each
of T steps an included canary is sampled with probability q and then shifts its statistic by 1/σ in
units of the noise (z_t ~ N(μ·sampled, 1), μ = 1/σ, the flat-clip Gaussian mechanism seen through a
perfect matched filter with no other examples); scores with the likelihood ratio that `dpft audit
--canary gradient` uses, then `dpft.audit.membership_test` (the same guess counts, Bonferroni and δ
term). `--noise 0.5` simulates a mechanism whose noise is half the ledger's (the σ-halved bug) while
the auditor still scores with the claimed σ. q, σ and T are the preset's: q = B / (250 + m) (B = 256), σ
calibrated by the RDP accountant for ε = 2 at δ = 1e-5 over 20 steps. Prints, per setting, the median
and range of the bound over the trials and the true ε of the simulated mechanism (RDP accountant).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def simulate(m: int, q: float, sigma: float, steps: int, noise: float, delta: float, rng) -> float:
    from dpft.audit import membership_test

    included = rng.random(m) < 0.5
    mu = 1.0 / sigma
    sampled = (rng.random((m, steps)) < q) & included[:, None]
    z = noise * rng.standard_normal((m, steps)) + mu * sampled
    log_out = np.log1p(-q) if q < 1 else -np.inf
    scores = np.logaddexp(log_out, np.log(q) + mu * z - mu * mu / 2).sum(1)
    return membership_test(scores, included, delta, 0.95)["epsilon_lower_bound"]


def main() -> None:
    from dpft.engine import accountant as acct

    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--noise", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256, help="train.batch_size: q = B / (250 + m)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(args.seed)
    steps, delta, eps = 20, 1e-5, 2.0
    print("m     q       σ      noise  true ε  ideal bound median [min, max]")
    for m in args.m:
        q = args.batch_size / (250 + m)
        sigma = acct.calibrate_sigma(eps, delta, q, steps, "rdp")
        for noise in args.noise:
            a = acct.make_accountant("rdp")
            a.history = [(sigma * noise, q, steps)]
            true_eps = acct.epsilon_of(a, delta)
            b = np.array([simulate(m, q, sigma, steps, noise, delta, rng) for _ in range(args.trials)])
            print(f"{m:<5d} {q:.4f}  {sigma:.3f}  ×{noise:<4g}  {true_eps:6.3f}  {np.median(b):.3f} "
                  f"[{b.min():.3f}, {b.max():.3f}]")


if __name__ == "__main__":
    main()
