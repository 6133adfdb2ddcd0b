"""Privacy accounting: σ calibration, the run's accountant, and an independent cross-check.

Assumption everywhere: each optimizer step is one Poisson-subsampled Gaussian mechanism
(every example joins the logical batch independently with probability q; add/remove-one
neighbours) whose noise std divided by the L2 sensitivity is the noise multiplier σ. The run's
accountant is Opacus' (RDP or PRV); the cross-check is Google's ``dp_accounting`` (RDP for RDP,
PLD for PRV), a separate implementation.
"""

from __future__ import annotations

import math

from dpft.errors import DpftError


class Accountant:
    """The run's ledger: the composition [(σ, q, steps), ...] of its Poisson-subsampled Gaussian
    steps (Opacus' history format) and the ε it spends. It owns that history: `step` is the only
    way to add to it, and a resumed run rebuilds it from the checkpoint's copy (`history=`)."""

    def __init__(self, name: str, history=()):
        from opacus.accountants import PRVAccountant, RDPAccountant

        self.name = name
        self._opacus = {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()
        self._opacus.history = [(float(s), float(q), int(t)) for s, q, t in history]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._opacus.history)

    def step(self, sigma: float, q: float, steps: int = 1) -> None:
        """Charge `steps` more steps of one Poisson-subsampled Gaussian mechanism (σ, q)."""
        for _ in range(int(steps)):
            self._opacus.step(noise_multiplier=sigma, sample_rate=q)

    def epsilon(self, delta: float) -> float:
        if not self._opacus.history:
            return 0.0
        return float(self._opacus.get_epsilon(delta=delta))


def default_delta(n: int) -> float:
    """δ = N^-1.1 (private-transformers' default): below 1/N, so no single example can be leaked
    with the δ slack."""
    return float(n) ** -1.1


def calibrate_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest σ (within Opacus' bisection tolerance 0.01 in ε) whose ε after `steps` steps is
    at most `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as e:
        raise DpftError(f"cannot calibrate σ for ε={epsilon}, δ={delta}, q={sample_rate:.4g}, "
                        f"steps={steps}: {e}") from None


def independent_epsilon(history, delta: float, accountant: str) -> float:
    """ε of an Opacus-style history [(σ, q, steps), ...] computed by dp_accounting."""
    import dp_accounting
    from dp_accounting import pld, rdp

    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
        for sigma, q, steps in history]
    if not events:
        return 0.0
    event = dp_accounting.ComposedDpEvent(events)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else float("inf")


def _rdp_one_step(sigma: float, q: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    return privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


class EpsilonMeter:
    """ε spent so far, cheap enough to log at every step (ε is public: a function of σ, q, the
    step count and δ only). For `rdp` the RDP of a composition is the sum of its steps' RDPs, so
    one-step RDP vectors are computed once per (σ, q) and ε(t) is Opacus' own conversion of
    t·RDP₁ — the value `RDPAccountant.get_epsilon` returns, at a fraction of its cost. For `prv`
    (numerical, ~1 s a call) it answers only when asked `exact=True`."""

    def __init__(self, accountant: str, delta: float):
        self.accountant, self.delta = accountant, float(delta)
        self._one: dict[tuple[float, float], object] = {}

    def epsilon(self, history, exact: bool = False) -> float | None:
        history = [tuple(h) for h in history]
        if not history:
            return 0.0
        if self.accountant != "rdp":
            if not exact:
                return None
            return Accountant(self.accountant, history).epsilon(self.delta)
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as privacy_analysis

        total = 0.0
        for sigma, q, steps in history:
            key = (float(sigma), float(q))
            if key not in self._one:
                self._one[key] = _rdp_one_step(*key)
            total = total + self._one[key] * int(steps)
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=self.delta)
        return float(eps)
