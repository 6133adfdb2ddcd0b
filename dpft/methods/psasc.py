"""DP-PSASC and DP-PSAC: non-monotone per-sample adaptive scaling instead of clipping, plus
momentum variance reduction as post-processing.

Papers: Huang et al., "Enhancing DP-SGD through Non-monotonous Adaptive Scaling Gradient Weight"
(DP-PSASC, arXiv 2411.03059); Xia et al., "Differentially Private Learning with Per-Sample Adaptive
Clipping" (DP-PSAC, AAAI 2023). Notes: /work/shared/papers/psasc.md and algorithms-detail.md §3.

**Provenance** (tags: [P] read in the paper, [R] reconstructed, [U] unknown, [N] second-hand).
The paper's algorithm box was not available to us. Everything below except the PSAC weight
(s = 1, [N]: a third-party port quoting Xia et al., via algorithms-detail.md §3) is *[R]
reconstructed* from algorithms-detail.md §3, not verified against the paper; the paper's
hyperparameter defaults are [U] and the config values are starting points, not the paper's.

Per-sample rule (x = ‖g_i‖, the flat L2 norm over all trainable parameters)::

    w(x) = C / (s·x + r / (x + r))          r_term: norm    (default; the issue's form)
    w(x) = C / (s·x + r / (s·x + r))        r_term: scaled  (algorithms-detail §3: PSAC applied to s·g)

with C = ``privacy.clip_norm``, s > 0, r > 0. Both forms coincide for s = 1, which is DP-PSAC's
C / (x + r/(x + r)). The placement of s inside the r-term differs between third-party
descriptions, so it is a documented knob rather than a silent choice.

Sensitivity. ‖w(g)·g‖ = C·x / (s·x + r/(·)) < C·x / (s·x) = C/s for every g, because the r-term is
strictly positive (x = 0 contributes 0; x → ∞ tends to C/s from below). So ``sensitivity()`` is
C/s. The bound is exact in real arithmetic and holds up to float rounding, as DP-SGD's
min(1, C/x)·x does. Non-finite norms (NaN/inf loss or gradient, or a squared norm overflowing
float32) are rejected with a `DpftError`, never scaled into the sum.

Noise and accounting. The engine adds N(0, (σ·C/s)² I) to the scaled sum (``noise_std`` =
σ · sensitivity), so noise std / sensitivity = σ and the accountant composes exactly the same
Poisson-subsampled Gaussian mechanism (σ, q, steps) as DP-SGD; σ is calibrated from
(ε, δ, q, T) by the engine as for DP-SGD. ε for the same (σ, q, steps) is identical to DP-SGD's;
only the scale of signal and noise changes (by 1/s), which an optimizer's learning rate absorbs.

Momentum (post-processing, *[R]* algorithms-detail §3 step 3). With G̃_t the privatised mean the
engine hands to ``postprocess``::

    v_t = G̃_t                              for t ≤ K0 (warm-up)
    v_t = (1 − γ)·v_{t−1} + γ·G̃_t          for t > K0
    update direction = v_t

γ is the weight of the *new* privatised gradient (γ = 1: no momentum, used by ``psac``). K0 = 0
starts the average at v_1 = G̃_1 (no zero-initialised, biased buffer). This only reads the
privatised G̃_t and the public step counter, so it costs no privacy. psasc.md phrases the same
EMA with γ on the old buffer; we follow algorithms-detail §3. If the paper's estimator is
STORM-like (per-sample differences at θ_t and θ_{t−1}) it is a different mechanism with
sensitivity up to (2 − γ)C/s and is deliberately NOT implemented here. The optimizer
(``optim``) still runs on top of v_t; whether the paper's update is plain SGD is [U] (no source
we could read says so).

What s does (exact algebra, not a claim about the paper). With ``r_term: norm``,
w_s,r(x) = C/(s·x + r/(x + r)) = (1/s)·C/(x + (r/s)/(x + r)) and the noise σC/s carries the same
1/s, so the privatised gradient of (s, r) is 1/s times that of (1, r/s) (up to the r-term's inner
x + r vs x + r/s). Under a scale-invariant optimizer (Adam/AdamW, up to its ε) the 1/s cancels and
s only rescales r; once x ≫ √(r/s) the weight is ≈ C/(s·x), i.e. DP-SGD with every example
clipped, whatever s. Under SGD at a fixed lr the 1/s survives as a step-size factor (on signal
and noise alike) and the knee r/s moves. ``dpft sweep psasc`` runs both; docs/fidelity.md has the
measured per-sample norms (2–4 for MiniLM on SST-2, so at C = 0.1 the AdamW rows coincide).

Diagnostics. ``diagnostics()`` returns quantiles (p10/p50/p90) of the per-sample norms and
weights that ``clip_factors`` saw in the last step, and the largest contribution as a fraction of
the bound C/s. Per-sample norms are private quantities: these are **non-private diagnostics**
(like the engine's alignment cosines), logged for analysis only, never fed back into training.
Turn them off with ``method.log_norms=false``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from dpft.errors import DpftError
from dpft.methods.base import Method, cfg_get, cfg_number, register

R_TERMS = ("norm", "scaled")


def psasc_weights(norms: Tensor, clip_norm: float, s: float, r: float, r_term: str = "norm") -> Tensor:
    """w_i = C / (s·x_i + r / (x_i + r)) (``norm``) or C / (s·x_i + r / (s·x_i + r)) (``scaled``).

    Computed in float64 so that huge norms neither overflow the denominator nor lose the r-term
    before the cast back; returned in the dtype and on the device of ``norms``."""
    if not torch.isfinite(norms).all():
        raise DpftError(
            "non-finite per-sample gradient norm (NaN/inf loss or gradient, or a squared norm that "
            "overflows float32); lower the learning rate or check the data — dpft never scales a "
            "non-finite gradient into the privatised sum"
        )
    x = norms.detach().double()
    sx = s * x
    inner = x if r_term == "norm" else sx
    w = clip_norm / (sx + r / (inner + r))
    return w.to(norms.dtype)




@register("psasc")
class PSASC(Method):
    """DP-PSASC: w(g) = C/(s‖g‖ + r/(‖g‖ + r)), sensitivity C/s, noise σC/s, EMA momentum."""

    supports_ghost = True  # the weight is a function of the flat per-sample norm only

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.s = self._positive(m, "s", 1.0)
        self.r = self._positive(m, "r", 0.01)
        self.r_term = str(cfg_get(m, "r_term", "norm"))
        if self.r_term not in R_TERMS:
            raise DpftError(f"method.r_term must be one of {', '.join(R_TERMS)}, got {self.r_term!r}")
        mom = cfg_get(m, "momentum", None)
        self.gamma = self._number(mom, "gamma", 1.0, "method.momentum.gamma")
        if not 0.0 < self.gamma <= 1.0:
            raise DpftError(f"method.momentum.gamma must be in (0, 1] (1 = no momentum), got {self.gamma}")
        warmup = self._number(mom, "warmup", 0, "method.momentum.warmup")
        if warmup < 0 or warmup != int(warmup):
            raise DpftError(f"method.momentum.warmup (K0) must be an integer >= 0, got {warmup}")
        self.warmup = int(warmup)
        self.log_norms = bool(cfg_get(m, "log_norms", True))
        self._buf: dict[str, Tensor] | None = None  # v_{t-1}
        self._last_step = 0
        self._pending: list[tuple[Tensor, Tensor]] = []  # (norms, weights) of this step's micro-batches
        self._seen: tuple[Tensor, Tensor] | None = None  # the last completed step's

    @staticmethod
    def _number(node, key, default, full_key):
        return cfg_number(node, key, default, full_key)

    @classmethod
    def _positive(cls, node, key, default):
        value = cls._number(node, key, default, f"method.{key}")
        if not value > 0:
            # s = 0 would make the sensitivity C/s infinite; r = 0 makes w(0) = 0/0
            raise DpftError(f"method.{key} must be > 0, got {value}")
        return value

    # -- 2. per-sample rule ----------------------------------------------------------------------
    def sensitivity(self) -> float:
        return self.privacy.clip_norm / self.s

    def clip_factors(self, sq_norms: Tensor) -> Tensor:
        norms = sq_norms.sum(0).sqrt()
        w = psasc_weights(norms, self.privacy.clip_norm, self.s, self.r, self.r_term)
        if self.log_norms:
            self._pending.append((norms.detach().double().cpu(), w.detach().double().cpu()))
        return w

    # -- 5. post-processing: momentum --------------------------------------------------------------
    def postprocess(self, grads: dict[str, Tensor], noise_std: dict[str, float], step: int) -> dict[str, Tensor]:
        self._close_step()
        self._last_step = int(step)
        if self.gamma == 1.0:
            return grads
        if step <= self.warmup:
            if step == self.warmup:  # v_{K0} = G̃_{K0} seeds the average
                self._buf = {n: g.detach().clone() for n, g in grads.items()}
            return grads
        if self._buf is None:  # K0 = 0 (or resumed without state): v_t = G̃_t
            self._buf = {n: g.detach().clone() for n, g in grads.items()}
            return grads
        out = {}
        for name, g in grads.items():
            v = self._buf[name]
            v.mul_(1.0 - self.gamma).add_(g, alpha=self.gamma)
            out[name] = v.clone()  # the optimizer may touch p.grad; the buffer must stay v_t
        return out

    # -- diagnostics (non-private) ---------------------------------------------------------------
    def _close_step(self) -> None:
        if self._pending:
            self._seen = (torch.cat([p[0] for p in self._pending]), torch.cat([p[1] for p in self._pending]))
        else:
            self._seen = None  # empty Poisson draw: nothing was scaled this step
        self._pending = []

    nonprivate_diagnostics = True  # per-sample norm and weight quantiles

    def diagnostics(self) -> dict[str, float]:
        """Non-private: quantiles of the per-sample norms ‖g‖ and weights w seen this step."""
        if not self.log_norms:
            return {}
        keys = ("norm_p10", "norm_p50", "norm_p90", "weight_p10", "weight_p50", "weight_p90", "contrib_max_frac")
        if self._seen is None or self._seen[0].numel() == 0:
            return {k: float("nan") for k in keys}
        norms, w = self._seen
        qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        nq, wq = torch.quantile(norms, qs).tolist(), torch.quantile(w, qs).tolist()
        contrib = float((w * norms).max()) / self.sensitivity()  # ≤ 1 by the sensitivity bound
        return dict(zip(keys, nq + wq + [contrib]))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self._last_step,
                "momentum": None if self._buf is None else {n: t.clone() for n, t in self._buf.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._last_step = int(state.get("step", 0))
        buf = state.get("momentum")
        self._buf = None if buf is None else {n: t.clone() for n, t in buf.items()}


@register("psac")
class PSAC(PSASC):
    """DP-PSAC (Xia et al. 2023): the s = 1, no-momentum case of the same implementation."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.s != 1.0 or self.gamma != 1.0:
            raise DpftError(
                f"method=psac is DP-PSAC (s = 1, no momentum), got s={self.s}, momentum.gamma={self.gamma}; "
                "use method=psasc to change s or add momentum"
            )
