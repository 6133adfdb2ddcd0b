"""Spiked-model formulas [R] (module docstring of ``dpft.methods.denoise``): the Marchenko–Pastur
bulk edge, the BBP map and its inverse, the singular-vector overlaps and the shrinkers.
λ: observed singular value, θ: signal singular value, s: noise std, n × m: the matrix shape."""

from __future__ import annotations

import math

import torch
from torch import Tensor


# η_i given to each kept singular value λ_i (module docstring, step 3). The paper's choice is [U].
SHRINKERS = ("optimal", "spike", "hard")


def bulk_edge(noise_std: float, n: int, m: int) -> float:
    """Largest singular value of an n × m pure-noise matrix with N(0, s²) entries, n, m → ∞."""
    return float(noise_std) * (math.sqrt(n) + math.sqrt(m))


def _as64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def bbp_forward(theta, noise_std: float, n: int, m: int) -> Tensor:
    """F(θ) = √[(θ + s²n/θ)(θ + s²m/θ)]: where a rank-one signal of strength θ > s(nm)^¼ shows up."""
    t, s2 = _as64(theta), float(noise_std) ** 2
    return torch.sqrt((t + s2 * n / t) * (t + s2 * m / t))


def bbp_inverse(lam, noise_std: float, n: int, m: int) -> Tensor:
    """θ̂ = F⁻¹(λ) = √[(a + √(a² − 4s⁴nm))/2], a = λ² − s²(n+m); 0 at or below the bulk edge."""
    lam, s2 = _as64(lam), float(noise_std) ** 2
    a = lam**2 - s2 * (n + m)
    disc = (a**2 - 4 * s2**2 * n * m).clamp_min(0)
    return torch.sqrt(((a + disc.sqrt()) / 2).clamp_min(0)) * (lam > bulk_edge(noise_std, n, m))


def overlaps(theta, noise_std: float, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Predicted squared cosines (left vector in ℝⁿ, right vector in ℝᵐ) between the noisy and the
    true singular vectors of a spike of strength θ: c_d² = (1 − s⁴nm/θ⁴)/(1 + s²d/θ²)."""
    t, s2 = _as64(theta), float(noise_std) ** 2
    num = (1 - s2**2 * n * m / t**4).clamp_min(0)
    return num / (1 + s2 * n / t**2), num / (1 + s2 * m / t**2)


def shrink(lam, noise_std: float, n: int, m: int) -> Tensor:
    """Frobenius-optimal shrinkage η = √[(λ² − s²(n+m))² − 4s⁴nm]/λ (Gavish–Donoho form; equal to
    θ̂·c_n·c_m). Continuous, 0 at the bulk edge and below."""
    lam, s2 = _as64(lam), float(noise_std) ** 2
    a = lam**2 - s2 * (n + m)
    val = torch.sqrt((a**2 - 4 * s2**2 * n * m).clamp_min(0)) / lam.clamp_min(torch.finfo(torch.float64).tiny)
    return val * (lam > bulk_edge(noise_std, n, m))


def shrink_rows(sig: Tensor, s: Tensor, n: int, m: int, shrinker: str = "optimal") -> Tensor:
    """η for a batch: sig (b, k) fp64, s (b,) fp64 on the same device; 0 at or below the bulk edge.
    ``optimal``: ``shrink`` (Frobenius-optimal, θ̂·c_n·c_m); ``spike``: θ̂ = F⁻¹(λ) (``bbp_inverse``,
    the signal value without the vector-overlap factor); ``hard``: λ itself (plain truncation)."""
    s2 = (s**2)[:, None]
    a = sig**2 - s2 * (n + m)
    disc = torch.sqrt((a**2 - 4 * s2**2 * n * m).clamp_min(0))
    if shrinker == "optimal":
        val = disc / sig.clamp_min(torch.finfo(torch.float64).tiny)
    elif shrinker == "spike":
        val = torch.sqrt(((a + disc) / 2).clamp_min(0))
    else:  # hard
        val = sig
    return torch.where(sig > (s[:, None] * (math.sqrt(n) + math.sqrt(m))), val, torch.zeros_like(val))
