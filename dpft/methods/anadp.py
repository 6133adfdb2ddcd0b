"""ANADP: adaptive noise allocation by parameter importance, at exactly the calibrated privacy.

Paper: Li, Zmigrod, Ma, Liu, Zhu, "Fine-Tuning Language Models with Differential Privacy through
Adaptive Noise Allocation" (arXiv 2410.02912, EMNLP Findings 2024). Notes:
/work/shared/papers/anadp.md and algorithms-detail.md §4.

**Provenance** (tags: [P] read in the paper, [R] the project's construction, [U] unknown, [N]
second-hand). Only the abstract could be read: noise is allocated by parameter importance under
the same budget [P abstract]. That the importance is sensitivity × uncertainty from moving
averages is [N] (a review aggregator, via algorithms-detail §4). **Per-group clipping C_g, the
clipping split κ_g and the allocation map π → s_g below are the project's construction [R]**
(option (ii) of algorithms-detail §4b.3), chosen because they make the budget exact; whether the
paper clips per group, and its map, are [U]. The AdaLoRA form of the score is [R]; β1/β2,
sharpness, floors, warm-up and the group granularity of the paper are [U], and the config values
are starting points, not the paper's. What is *not* a guess is the privacy argument: it holds for
any allocation this module can produce.

Isolating reallocation. Even with uniform shares this is per-group clipping (C_g = C/√G over G
groups, ~200 tensors for a full RoBERTa-base), not DP-SGD's flat clip. ``alpha: 0`` keeps the
per-group clipping and gives every group DP-SGD's noise σC (π = κ): the control row of
``dpft sweep anadp`` that separates "per-group clipping" from "noise reallocation".

Privacy argument (option (ii) of algorithms-detail §4b.3):

1. Each example's gradient restricted to group g is clipped to L2 norm ≤ C_g, so the Mahalanobis
   sensitivity under the noise covariance is √(Σ_g C_g²/s_g²) for any example.
2. Adding N(0, s_g² I) to group g of the sum is, after whitening each group by s_g, one Gaussian
   mechanism with noise multiplier σ_eff = (Σ_g C_g²/s_g²)^(−1/2).
3. The allocation is normalised so that Σ_g (C_g/s_g)² = 1/σ², i.e. σ_eff = σ, the σ calibrated
   for (ε, δ, q, T); the accountant fed σ is therefore exact. The importance scores (hence the
   allocation of step t) are computed in ``postprocess`` of steps < t from privatised gradients and
   the weights only: post-processing plus adaptive composition, no extra privacy cost.

Float rounding: the noise stds are nudged up by a relative 1e-9 whenever float64 rounding would
make the computed σ_eff fall below σ, so σ_eff ∈ [σ, σ(1 + 1e-9)] and reporting σ to the
accountant is a valid (at most 1e-9-relative conservative) bound. ``diagnostics()['sigma_eff']``
logs the computed value every step.

Groups (``method.granularity``): ``tensor`` (default) = one group per trainable parameter tensor
(with LoRA: each lora_A / lora_B of each module, plus the trainable head); ``layer`` = all
tensors of encoder layer i (names containing ``layer.<i>.``) form one group; tensors outside any
encoder layer (embeddings, pooler, head) stay one group each.

Clipping budget (``method.clip_split``), fixed before training from public quantities:
κ_g = 1/G (``uniform``) or κ_g = numel_g / Σ numel (``numel``), C_g = C·√κ_g, so Σ_g C_g² = C² and
the ordinary L2 sensitivity of the whole contribution stays ≤ C = ``privacy.clip_norm``.

Importance [R] (AdaLoRA's sensitivity × uncertainty, applied to the privatised mean gradient G̃_t
the engine hands to ``postprocess`` and to the weights θ_t before the update), per entry k::

    I_k = |θ_k · ĝ_k|       ĝ = G̃_t (importance: adalora), or
                             ĝ = m_t = β_g m_{t−1} + (1 − β_g) G̃_t  (importance: smoothed)
    Ī   = β1 Ī + (1 − β1) I                    (zero-initialised, as AdaLoRA)
    Ū   = β2 Ū + (1 − β2) |I − Ī|
    S_g = mean over the entries of group g of Ī·Ū

Why ``smoothed`` [R]: |θ_k·G̃_k| takes the absolute value *before* averaging, so the noise in G̃
(per-entry std s_g/B, typically far above the clipped signal) never averages out of Ī: the score
then ranks groups by |θ|·(noise std) rather than by the gradient. Averaging G̃ first (β_g = 0.9
divides the noise std by ≈ 4.4 once the EMA has settled) lets a persistent gradient direction
dominate. Both read only privatised gradients and weights.

Diagnostics of the importance signal (post-processing, logged every step, never fed back):
``score_noise_corr`` and ``score_theta_corr`` are Spearman rank correlations, over groups, of the
score S_g with the group's per-entry noise std in G̃_t and with its mean |θ_g| (NaN when one side
is constant, e.g. uniform noise); ``sens_noise_ratio`` is the median over groups of
E[|θ·Z|]/mean|θ·ĝ|, the sensitivity that pure noise Z (per-entry std s_g/B, or its EMA-reduced
std) would produce relative to the observed one: near 1 the score is noise, near 0 it is signal.

Allocation map (the paper's is [U]; this one is ours)::

    π_g ∝ κ_g · (S_g / max S)^α, then water-filled into [floor·κ_g, ceiling·κ_g] with Σ π_g = 1
    C_g / s_g = √π_g / σ   ⇒   s_g = σ·C·√(κ_g/π_g)

π = κ (α = 0, the warm-up, or no usable score) gives s_g = σC for every group: DP-SGD's noise,
with per-group instead of flat clipping. A group whose share grows to π_g = ρκ_g gets noise std
σC/√ρ (less than DP-SGD) and others get more, so ``floor``/``ceiling`` bound every group's noise
std to [σC/√ceiling, σC/√floor]. The first ``warmup`` steps (and step 1, before any privatised
gradient exists) use π = κ.

Needs per-parameter clip factors, so hooks mode only (``supports_ghost = False``): run with
``engine.grad_sample_mode=hooks``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from dpft.errors import DpftError
from dpft.methods.base import Method, cfg_choice, cfg_number, clip_flat, register

GRANULARITIES = ("tensor", "layer")
IMPORTANCES = ("adalora", "smoothed")
CLIP_SPLITS = ("uniform", "numel")
_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.")
_NUDGE = 1e-9  # relative upward nudge of s_g against float64 rounding (σ_eff never below σ)




def group_names(names: list[str], granularity: str) -> list[str]:
    """Group label of each parameter name (order preserved)."""
    if granularity == "tensor":
        return list(names)
    out = []
    for n in names:
        m = _LAYER_RE.search(n)
        out.append(f"layer.{m.group(1)}" if m else n)
    return out


def water_fill(weights: Tensor, lo: Tensor, hi: Tensor, iters: int = 200) -> Tensor:
    """π_g = clamp(c·w_g, lo_g, hi_g) with c chosen so that Σ π_g = 1 (float64).

    Needs Σ lo ≤ 1 ≤ Σ hi and w > 0. f(c) = Σ clamp(c·w, lo, hi) is continuous and nondecreasing,
    so bisection on log c converges; the final division by Σ π removes the bisection residue."""
    w, lo, hi = weights.double(), lo.double(), hi.double()
    a, b = math.log(1e-300), math.log(1e300)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if float(torch.clamp(math.exp(mid) * w, lo, hi).sum()) < 1.0:
            a = mid
        else:
            b = mid
    pi = torch.clamp(math.exp(0.5 * (a + b)) * w, lo, hi)
    return pi / pi.sum()


def shares_from_scores(scores: Tensor, kappa: Tensor, alpha: float, floor: float, ceiling: float) -> Tensor:
    """Importance shares π (Σ π = 1, floor·κ ≤ π ≤ ceiling·κ up to rounding) from group scores.
    Falls back to π = κ when no score is usable (all zero or non-finite)."""
    s = scores.double()
    kappa = kappa.double()
    if not torch.isfinite(s).all() or float(s.max()) <= 0.0 or alpha == 0.0:
        return kappa / kappa.sum()
    rel = (s / s.max()).clamp_min(1e-30)  # zero-score groups (e.g. LoRA B at init) sink to the floor
    w = kappa * rel.pow(alpha)
    return water_fill(w, floor * kappa, ceiling * kappa)


def allocate(pi: Tensor, kappa: Tensor, clip_norm: float, sigma: float) -> tuple[Tensor, Tensor]:
    """(C_g, s_g) in float64 with Σ_g (C_g/s_g)² = 1/σ², so σ_eff = σ (never below it)."""
    pi, kappa = pi.double(), kappa.double()
    if not (pi > 0).all() or not torch.isfinite(pi).all():
        raise DpftError("ANADP allocation: every share π_g must be positive and finite")
    pi = pi / pi.sum()
    c = clip_norm * kappa.sqrt()
    s = sigma * c / pi.sqrt()
    eff = sigma_eff(c, s)
    if eff < sigma:  # rounding only: push the noise up, never down
        s = s * (sigma / eff) * (1.0 + _NUDGE)
    assert sigma_eff(c, s) >= sigma
    return c, s


def sigma_eff(clips: Tensor, stds: Tensor) -> float:
    """σ_eff = (Σ_g C_g²/s_g²)^(−1/2) of per-group clipping C_g with per-group noise s_g."""
    r = (clips.double() / stds.double()).pow(2).sum()
    return float(r.rsqrt())


def _spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation over groups (scipy), NaN when either side is constant or < 3 groups."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok], b[ok]
    if a.numel() < 3 or float(a.max() - a.min()) == 0.0 or float(b.max() - b.min()) == 0.0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _signal_diagnostics(scores: Tensor, noise: Tensor, theta_abs: Tensor, sens: Tensor, shrink: float) -> dict:
    """Is the importance score signal or noise? (module docstring; privatised inputs only)."""
    # pure noise Z with per-entry std τ gives E|θ_k Z_k| = |θ_k|·τ·√(2/π)
    floor = theta_abs * noise * shrink * math.sqrt(2 / math.pi)
    ratio = floor / sens.clamp_min(1e-300)
    ratio = ratio[torch.isfinite(ratio) & (sens > 0)]
    return {
        "score_noise_corr": _spearman(scores, noise),
        "score_theta_corr": _spearman(scores, theta_abs),
        "sens_noise_ratio": float(ratio.median()) if ratio.numel() else float("nan"),
    }


@register("anadp")
class ANADP(Method):
    """Per-group clipping C_g and noise s_g, importance-driven, with σ_eff = calibrated σ."""

    supports_ghost = False  # per-group clip factors need the per-parameter norms of hooks mode

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.granularity = cfg_choice(m, "granularity", "tensor", GRANULARITIES)
        self.clip_split = cfg_choice(m, "clip_split", "uniform", CLIP_SPLITS)
        self.beta1 = self._number(m, "beta1", 0.85)
        self.beta2 = self._number(m, "beta2", 0.85)
        for key, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                raise DpftError(f"method.{key} must be in [0, 1), got {b}")
        self.alpha = self._number(m, "alpha", 0.5)
        if self.alpha < 0:
            raise DpftError(f"method.alpha must be >= 0 (0 = uniform allocation), got {self.alpha}")
        self.floor = self._number(m, "floor", 0.25)
        self.ceiling = self._number(m, "ceiling", 4.0)
        if not 0.0 < self.floor <= 1.0 <= self.ceiling:
            # floor = 0 would allow s_g → ∞ (a group switched off); Σπ = 1 needs floor ≤ 1 ≤ ceiling
            raise DpftError(f"method.floor/ceiling must satisfy 0 < floor <= 1 <= ceiling, "
                            f"got floor={self.floor}, ceiling={self.ceiling}")
        self.importance = cfg_choice(m, "importance", "adalora", IMPORTANCES)
        self.grad_beta = self._number(m, "grad_beta", 0.9)
        if not 0.0 <= self.grad_beta < 1.0:
            raise DpftError(f"method.grad_beta must be in [0, 1), got {self.grad_beta}")
        warmup = self._number(m, "warmup", 10)
        if warmup < 0 or warmup != int(warmup):
            raise DpftError(f"method.warmup must be an integer >= 0, got {warmup}")
        self.warmup = int(warmup)
        self.groups: list[str] = []
        self._gidx: Tensor | None = None  # [P] group index of each parameter, engine order
        self._kappa: Tensor | None = None
        self._pi: Tensor | None = None
        self._clips: Tensor | None = None
        self._stds: Tensor | None = None
        self._ema_i: dict[str, Tensor] = {}
        self._ema_u: dict[str, Tensor] = {}
        self._ema_g: dict[str, Tensor] = {}  # importance=smoothed: EMA of the privatised gradient
        self._step = 0  # last step whose privatised gradient entered the importance
        self._scores: Tensor | None = None
        self._signal: dict[str, float] = {}  # importance-signal diagnostics of the last step

    @staticmethod
    def _number(node, key, default):
        return cfg_number(node, key, default)

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, model, params, privacy) -> None:
        super().setup(model, params, privacy)
        if privacy is None:
            raise DpftError("method=anadp is a private method; it needs privacy parameters")
        labels = group_names(list(params), self.granularity)
        self.groups = list(dict.fromkeys(labels))
        pos = {g: i for i, g in enumerate(self.groups)}
        self._gidx = torch.tensor([pos[g] for g in labels], dtype=torch.long)
        if self.clip_split == "uniform":
            kappa = torch.ones(len(self.groups), dtype=torch.float64)
        else:
            kappa = torch.zeros(len(self.groups), dtype=torch.float64)
            kappa.index_add_(0, self._gidx, torch.tensor([float(p.numel()) for p in params.values()],
                                                         dtype=torch.float64))
        self._kappa = kappa / kappa.sum()
        self._ema_i = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self._ema_u = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self._ema_g = ({n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
                       if self.importance == "smoothed" else {})
        self._step = 0
        self.set_shares(self._kappa)

    def set_shares(self, pi: Tensor) -> None:
        """Install importance shares π (normalised here) and the (C_g, s_g) they imply."""
        self._pi = pi.double() / pi.double().sum()
        self._clips, self._stds = allocate(self._pi, self._kappa, self.privacy.clip_norm, self.privacy.sigma)

    # -- 2. per-group clipping -------------------------------------------------------------------
    def clip_factors(self, sq_norms: Tensor) -> Tensor:
        """[P, b]: every parameter of group g gets min(1, C_g/‖g_i restricted to g‖)."""
        idx = self._gidx.to(sq_norms.device)
        gsq = torch.zeros(len(self.groups), sq_norms.shape[1], dtype=torch.float64, device=sq_norms.device)
        gsq.index_add_(0, idx, sq_norms.double())
        clips = self._clips.to(sq_norms.device)[:, None]
        factors = clip_flat(gsq.sqrt(), clips)  # rejects non-finite norms; float64 until the cast
        return factors[idx].to(sq_norms.dtype)

    # -- 3. per-group noise ----------------------------------------------------------------------
    def group_clips(self) -> dict[str, float]:
        return dict(zip(self.groups, self._clips.tolist()))

    def group_stds(self) -> dict[str, float]:
        return dict(zip(self.groups, self._stds.tolist()))

    def noise_std(self) -> dict[str, float]:
        stds = self._stds.tolist()
        return {n: stds[int(g)] for n, g in zip(self.params, self._gidx)}

    def sigma_eff(self) -> float:
        return sigma_eff(self._clips, self._stds)

    def noise_multiplier(self) -> float:
        # σ_eff ∈ [σ, σ(1 + 1e-9)] by construction (allocate); σ is then a valid, exact-to-rounding
        # value for the accountant and keeps its history to one (σ, q) entry
        eff = self.sigma_eff()
        if not self.privacy.sigma <= eff <= self.privacy.sigma * (1 + 1e-8):
            raise DpftError(f"ANADP allocation broke the budget: σ_eff={eff}, σ={self.privacy.sigma}")
        return self.privacy.sigma

    # -- 5. importance (post-processing) -----------------------------------------------------------
    def postprocess(self, grads: dict[str, Tensor], noise_std: dict[str, float], step: int) -> dict[str, Tensor]:
        """Update the importance EMAs from the privatised G̃_t and θ_t, then fix the allocation
        for step t + 1. The update direction is G̃_t unchanged."""
        G = len(self.groups)
        scores = torch.zeros(G, dtype=torch.float64)
        counts = torch.zeros(G, dtype=torch.float64)
        sens_sum = torch.zeros(G, dtype=torch.float64)    # Σ_k |θ_k ĝ_k|
        theta_sum = torch.zeros(G, dtype=torch.float64)   # Σ_k |θ_k|
        noise = torch.zeros(G, dtype=torch.float64)       # per-entry noise std of G̃_t in group g
        # EMA of G̃ with bias correction: its noise std is s·√((1−β)(1+β^t)/((1+β)(1−β^t)))
        t = int(step)
        if self.importance == "smoothed":
            b = self.grad_beta
            shrink = math.sqrt((1 - b) * (1 + b ** t) / ((1 + b) * (1 - b ** t))) if b > 0 else 1.0
        else:
            shrink = 1.0
        with torch.no_grad():
            for k, (name, g) in enumerate(grads.items()):
                theta = self.params[name].detach().float()
                if self.importance == "smoothed":
                    m = self._ema_g[name]
                    m.mul_(self.grad_beta).add_(g.float(), alpha=1 - self.grad_beta)
                    ghat = m / (1 - self.grad_beta ** t) if self.grad_beta > 0 else m
                else:
                    ghat = g.float()
                sens = (theta * ghat).abs()
                ema_i, ema_u = self._ema_i[name], self._ema_u[name]
                ema_i.mul_(self.beta1).add_(sens, alpha=1 - self.beta1)
                ema_u.mul_(self.beta2).add_((sens - ema_i).abs(), alpha=1 - self.beta2)
                gi = int(self._gidx[k])
                scores[gi] += float((ema_i.double() * ema_u.double()).sum())
                counts[gi] += ema_i.numel()
                sens_sum[gi] += float(sens.double().sum())
                theta_sum[gi] += float(theta.abs().double().sum())
                noise[gi] = float(noise_std.get(name, float("nan")))
        self._scores = scores / counts.clamp_min(1)
        self._signal = _signal_diagnostics(self._scores, noise, theta_sum / counts.clamp_min(1),
                                           sens_sum / counts.clamp_min(1), shrink)
        self._step = int(step)
        if step + 1 > self.warmup:
            self.set_shares(shares_from_scores(self._scores, self._kappa, self.alpha, self.floor, self.ceiling))
        else:
            self.set_shares(self._kappa)
        return grads

    # -- diagnostics (privatised quantities only) --------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Allocation that the *next* step will use."""
        pi = self._pi
        entropy = float(-(pi * pi.clamp_min(1e-300).log()).sum())
        g = len(self.groups)
        return {
            "noise_std_min": float(self._stds.min()),
            "noise_std_max": float(self._stds.max()),
            "clip_min": float(self._clips.min()),
            "clip_max": float(self._clips.max()),
            "pi_entropy": entropy,
            "pi_entropy_norm": entropy / math.log(g) if g > 1 else 1.0,  # 1 = uniform shares
            "sigma_eff": self.sigma_eff(),
            "groups": float(g),
            "adaptive": float(self._step + 1 > self.warmup and self._step >= 1),
            **self._signal,
        }

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self._step, "groups": list(self.groups), "pi": self._pi.clone(),
                "ema_i": {n: t.clone() for n, t in self._ema_i.items()},
                "ema_u": {n: t.clone() for n, t in self._ema_u.items()},
                "ema_g": {n: t.clone() for n, t in self._ema_g.items()}}

    def load_state_dict(self, state: dict) -> None:
        if list(state["groups"]) != self.groups:
            raise DpftError("ANADP state was saved with different parameter groups")
        self._step = int(state["step"])
        self._ema_i = {n: t.clone() for n, t in state["ema_i"].items()}
        self._ema_u = {n: t.clone() for n, t in state["ema_u"].items()}
        if self.importance == "smoothed":
            if not state.get("ema_g"):
                raise DpftError("ANADP state has no gradient EMA (saved with method.importance=adalora)")
            self._ema_g = {n: t.clone() for n, t in state["ema_g"].items()}
        self.set_shares(state["pi"])
