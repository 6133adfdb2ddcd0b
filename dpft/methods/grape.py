"""DP-GRAPE: DP-Adam on seeded random projections of the linear layers' per-sample gradients.

Paper: Mulrooney et al., "Memory-Efficient Differentially Private Training with Gradient Random
Projection" (arXiv 2506.15588). Notes: /work/shared/papers/grape.md and algorithms-detail.md §5.

**Provenance.** Only the paper's abstract could be read. The algorithm below follows the
authors' released code, github saharsamr/StructuredVSRandomizedDP at commit d816877 (the
author's initial commit), marked [C] = [P] read in the code; files read for this docstring:
``dpgrape/dpgrape/rand_projector_dp.py`` (Gaussian P, std 1/rank, projected side),
``dpgrape/dpgrape/privacy/optimizergrape.py`` (noise std σC on the projected clipped sum),
``roberta_finetuning/roberta_finetuning_dpgrape.sh`` and ``roberta_finetuning_dpadam.sh``
(constant lr schedule for both). Elsewhere [R] = reconstructed by dpft, [U] = an option exposes
something the sources leave open, [N] = from the project's notes, not re-read.

Algorithm. For every projected weight W ∈ ℝ^{m×n} (out × in) of an ``nn.Linear``:

* **Projector** [C]. P has i.i.d. Gaussian entries, std 1/r (``proj_std: 1/r``, the code's
  ``torch.normal(0, 1/rank)``; the paper's own variance is [U]). It is *regenerated* from an
  integer seed whenever needed (hook, optimizer) and freed, never stored. The smaller dimension
  is projected (``side: auto``) [C]: m ≥ n → P ∈ ℝ^{r×n}, Ĝ = G Pᵀ ∈ ℝ^{m×r}; m < n → P ∈ ℝ^{m×r},
  Ĝ = Pᵀ G ∈ ℝ^{r×n}. ``side: in|out`` forces one side (``in`` is the brief's G·P with P d_in × r,
  transposed). Every ``refresh`` optimizer steps each layer gets a new seed [C: a fresh seed from
  the global RNG; R: dpft derives it from (seed, period, layer index) by numpy's SeedSequence so a
  resumed run regenerates the same P]. ``proj_std: 1/sqrt_r`` [R] gives E[PᵀP] = I (the
  back-projected gradient is unbiased). It is an ablation, *not* the code's method with another
  lr: P is applied before clipping, and the flat clip acts on the concatenation of the projected
  Ĝ_i and the unprojected gradients (embeddings, LayerNorm, biases, head), with noise σC not
  rescaled. Scaling P by √r scales the projected part of every per-sample vector by √r, so the
  projected layers' share of each example's clipping budget and their signal-to-noise ratio
  against σC change (by √r, 4× at r = 16) relative to the unprojected ones. Only with every
  trainable parameter projected and no clipping active would it reduce to an lr change.
* **Per-sample projection inside the backward hook** [R memory-lean form of the code's]. A custom
  Opacus grad sampler (registered for ``ProjectedLinear``, the projected layers' class) computes,
  from activations A_i [T×n] and output gradients Δ_i [T×m] of example i,
  side in: Ĝ_i = Δ_iᵀ (A_i Pᵀ);  side out: Ĝ_i = (Δ_i P)ᵀ A_i.
  Neither forms the b × m × n per-sample tensor (the code materialises it one layer at a time).
  Biases and every parameter outside projected layers get ordinary per-sample gradients.
  Autograd still forms the ordinary (summed, not per-sample) m × n gradient of W.
  Both engine paths are supported and give the same clipped sum (tested):
  ``engine.grad_sample_mode=hooks`` keeps every Ĝ_i until clipping (the code's scheme [C]);
  ``ghost`` (dpft's default) [R] lets Opacus' fast-gradient-clipping hooks reduce each layer's Ĝ_i
  to its per-sample norm at once (embeddings, LayerNorm: ghost norms), then a second backward of
  Σ_i w_i·loss_i gives Σ_i w_i G_i, projected as (Σ_i w_i G_i)·Pᵀ = Σ_i w_i Ĝ_i (``space_map``);
  ``bk`` (book-keeping) keeps the Ĝ_i of projected layers and sums them with the weights.
* **Which layers** [C]: trainable ``nn.Linear`` whose qualified name contains one of
  ``layers.include`` (attention, attn, dense, mlp) and none of ``layers.exclude``. The code excludes
  names with ``head`` and *freezes* pooler and classifier; dpft trains those with the ordinary
  per-sample path instead, so ``exclude`` also lists ``classifier`` and ``pooler`` [R]. A layer with
  r ≥ its projected dimension is left unprojected (no saving); a ``rank`` that projects no layer is
  a config error. ``rank: null`` projects nothing: the method is then exactly DP-Adam (flat
  clipping, σC noise, AdamW) on the hooks path; the sweep uses it as the DP-Adam baseline.
* **Clip, noise, average** [C]: flat clipping at C of the concatenation of all per-sample tensors
  (projected Ĝ_i and ordinary g_i), N(0, σ²C²) added entrywise to the clipped *sum* in the
  projected shapes, divided by the expected batch size B. This is dpft's engine unchanged: the
  method only declares each projected weight's privatised shape (``space_shape``).
* **Optimizer** [C]: Adam with bias correction whose moments of projected weights live in the
  projected shape; U = m̂/(√v̂ + ε) is mapped back (ΔW = U·P or P·U) with the *same* P as the
  step's backward pass, W ← W − η·ΔW. Moments are not reset when P is refreshed (the step count
  continues; ``reset_moments: true`` is GaLore's alternative). Decoupled weight decay (0 in every
  script of the code) is applied in the full space. Requires ``optim=adamw``. The code's RoBERTa
  scripts use a constant lr schedule for DP-GRAPE and DP-Adam alike [C]; dpft's default is linear
  decay (``train.lr_schedule``), so ``dpft sweep grape`` sets ``train.lr_schedule=constant``.

Privacy. P depends only on (seed, step, layer), never on data, and is applied *before* clipping,
so each example's clipped projected vector has norm ≤ C whatever P's entries (sensitivity C,
``sensitivity()``); noise σC on the sum is therefore the Poisson-subsampled Gaussian mechanism of
DP-SGD with the same (σ, q, steps), and dpft's accountant composes exactly that (ε, δ identical to
DP-SGD's for the same σ, q, T). Mapping back, Adam and the seed schedule are post-processing.
(The code uses fixed-size batches while accounting as Poisson; dpft samples Poisson batches.)

Diagnostics: ``method/noised_dims_frac`` (privatised coordinates / all trainable ones, public).
The engine's alignment cosines (``train/cos_*``) are computed in the privatised (projected) space.

Memory: per-sample storage of a projected layer drops from b·m·n to b·max(m,n)·r and Adam state
from 2mn to 2·max(m,n)·r; embeddings are not projected [C] and keep Opacus' b × V × d per-sample
gradient in hooks mode, which dominates what is left there on RoBERTa (ghost mode avoids it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpft.errors import DpftError
from dpft.methods.base import Method, cfg_bool, cfg_choice, cfg_get, register

log = logging.getLogger("dpft")

SIDES = ("auto", "in", "out")
PROJ_STDS = {"1/r": lambda r: 1.0 / r, "1/sqrt_r": lambda r: 1.0 / math.sqrt(r)}


@dataclass
class Projector:
    """A seeded Gaussian projection of one m × n weight gradient to rank r. Holds no tensor: P is
    regenerated from ``seed`` on every use.

    side ``in``: P is r × n and Ĝ = G·Pᵀ (m × r), back: U·P.
    side ``out``: P is m × r and Ĝ = Pᵀ·G (r × n), back: P·U."""

    out_features: int
    in_features: int
    rank: int
    side: str
    std: float
    seed: int = 0

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.rank, self.in_features) if self.side == "in" else (self.out_features, self.rank)

    @property
    def projected_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.rank) if self.side == "in" else (self.rank, self.in_features))

    def matrix(self, device, dtype=torch.float32) -> Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(self.seed))
        p = torch.randn(self.matrix_shape, generator=gen, device=device, dtype=torch.float32)
        return p.mul_(self.std).to(dtype)

    def project(self, g: Tensor) -> Tensor:
        """Ĝ of a full gradient g [..., m, n] (reference / tests; the hooks never form g)."""
        p = self.matrix(g.device, g.dtype)
        return g @ p.T if self.side == "in" else p.T @ g

    def back(self, u: Tensor) -> Tensor:
        """Map a projected-space tensor [m×r | r×n] back to the weight's m × n space."""
        p = self.matrix(u.device, u.dtype)
        return u @ p if self.side == "in" else p @ u


class ProjectedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight gets projected per-sample gradients (its ``grape`` projector).
    Projected layers are switched to this class in place (same parameters, same forward), so the
    Opacus sampler registered for it never touches other methods' ``nn.Linear``."""

    grape: Projector


def projected_linear_grad_sample(layer: ProjectedLinear, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus grad sampler: per-sample Ĝ_i from activations and output gradients, never b×m×n."""
    a = activations[0].to(backprops.dtype)  # [b, ..., n]
    proj = layer.grape
    ret = {}
    if layer.weight.requires_grad:
        p = proj.matrix(a.device, a.dtype)
        if proj.side == "in":  # Ĝ_i = Δ_iᵀ (A_i Pᵀ): [b, m, r]
            ret[layer.weight] = torch.einsum("n...i,n...j->nij", backprops, a @ p.T)
        else:  # Ĝ_i = (Δ_i P)ᵀ A_i: [b, r, n]
            ret[layer.weight] = torch.einsum("n...i,n...j->nij", backprops @ p, a)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...k->nk", backprops)
    return ret


def _register_sampler() -> None:
    from opacus.grad_sample import GradSampleHooks, register_grad_sampler

    if GradSampleHooks.GRAD_SAMPLERS.get(ProjectedLinear) is not projected_linear_grad_sample:
        register_grad_sampler(ProjectedLinear)(projected_linear_grad_sample)


def layer_seed(base: int, period: int, index: int) -> int:
    """Public, data-independent seed of layer ``index`` in refresh period ``period``."""
    import numpy as np

    return int(np.random.SeedSequence([int(base), int(period), int(index)]).generate_state(1)[0])


class GrapeAdam(torch.optim.Optimizer):
    """Adam(W) whose moments of projected weights live in the projected space.

    Ordinary parameters read ``p.grad`` and follow torch's AdamW update exactly. A projected
    weight reads its privatised projected gradient from ``projected_grads[p]`` (set by
    ``Grape.apply_update``), updates its moments there, and applies W ← W − lr·back(m̂/(√v̂+ε))."""

    def __init__(self, params, projectors: dict[nn.Parameter, Projector], lr: float, betas, eps: float,
                 weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.projectors = projectors
        self.projected_grads: dict[nn.Parameter, Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                proj = self.projectors.get(p)
                g = self.projected_grads.pop(p, None) if proj is not None else p.grad
                if g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1.0 - lr * wd)
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (v.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(eps)
                step_size = lr / (1.0 - b1 ** t)
                if proj is None:
                    p.addcdiv_(m, denom, value=-step_size)
                else:
                    p.add_(proj.back(m / denom).to(p.dtype), alpha=-step_size)
        self.projected_grads.clear()
        return None

    def reset_projected_state(self) -> None:
        for p in self.projectors:
            self.state.pop(p, None)


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise DpftError(f"method.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@register("grape")
class Grape(Method):
    """DP-GRAPE: flat clipping and σC noise on seeded random projections of linear-layer
    per-sample gradients, Adam in the projected space (see the module docstring)."""

    supports_ghost = True  # clip factors depend on the flat (projected) norm only; space_map is linear

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        rank = cfg_get(m, "rank", None)
        self.rank = None if rank is None else _int(rank, "rank", 1)
        self.refresh = _int(cfg_get(m, "refresh", 100), "refresh", 1)
        seed = cfg_get(m, "seed", None)
        self.seed = int(cfg.seed) if seed is None else _int(seed, "seed", 0)
        self.side = cfg_choice(m, "side", "auto", SIDES)
        self.proj_std = cfg_choice(m, "proj_std", "1/r", PROJ_STDS)
        layers = cfg_get(m, "layers", {})
        self.include = self._patterns(cfg_get(layers, "include", ["attention", "attn", "dense", "mlp"]), "include")
        self.exclude = self._patterns(cfg_get(layers, "exclude", []), "exclude")
        if not self.include:
            raise DpftError("method.layers.include must name at least one pattern (use method.rank=null for DP-Adam)")
        self.reset_moments = cfg_bool(m, "reset_moments", False)
        if str(cfg.optim.name) != "adamw":
            raise DpftError(f"method=grape keeps Adam moments in the projected space and needs optim=adamw, "
                            f"got optim={cfg.optim.name}")
        self._layers: list[tuple[str, ProjectedLinear]] = []  # projected modules, in model order
        self._by_param: dict[nn.Parameter, Projector] = {}
        self._by_name: dict[str, Projector] = {}
        self._prepared: nn.Module | None = None
        self._period = -1
        self._step = 0
        self._noised_frac = 1.0

    @staticmethod
    def _patterns(value, key: str) -> list[str]:
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise DpftError(f"method.layers.{key} must be a list of name substrings, got {value!r}")
        return [v.lower() for v in value]

    # -- model ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Switch the selected ``nn.Linear`` layers to ``ProjectedLinear`` (in place: same
        parameters and forward) and register the projected grad sampler with Opacus."""
        _register_sampler()
        self._layers, self._by_param, skipped = [], {}, []
        if self.rank is not None:
            std = PROJ_STDS[self.proj_std](self.rank)
            for name, mod in model.named_modules():
                if type(mod) not in (nn.Linear, ProjectedLinear) or not mod.weight.requires_grad:
                    continue
                low = name.lower()
                if not any(s in low for s in self.include) or any(s in low for s in self.exclude):
                    continue
                m, n = mod.weight.shape
                side = self.side if self.side != "auto" else ("in" if m >= n else "out")
                if self.rank >= (n if side == "in" else m):
                    skipped.append(name)
                    continue
                mod.__class__ = ProjectedLinear
                mod.grape = Projector(m, n, self.rank, side, std)
                self._layers.append((name, mod))
                self._by_param[mod.weight] = mod.grape
            if not self._layers:
                raise DpftError(f"method.rank={self.rank} projects no layer of {type(model).__name__}: no trainable "
                                f"nn.Linear matches method.layers with a dimension > rank (method.rank=null is DP-Adam)")
        if skipped:
            log.info("grape: %d layers have a dimension <= rank %s and stay unprojected", len(skipped), self.rank)
        self._prepared = model
        self._period = -1
        self._set_period(self._step // self.refresh)
        return model

    def setup(self, model, params, privacy) -> None:
        super().setup(model, params, privacy)
        if self._prepared is not model:
            self.prepare_model(model)
        self._by_name = {n: self._by_param[p] for n, p in params.items() if p in self._by_param}
        if len(self._by_name) != len(self._by_param):
            raise DpftError("grape: a projected layer's weight is not among the trainable parameters")
        full = sum(p.numel() for p in params.values())
        noised = sum(math.prod(self.space_shape(n, p)) for n, p in params.items())
        self._noised_frac = noised / max(full, 1)
        log.info("grape: %d projected layers (rank %s, refresh %d); privatised coordinates %d of %d (%.1f%%)",
                 len(self._by_name), self.rank, self.refresh, noised, full, 100 * self._noised_frac)

    def _set_period(self, period: int) -> None:
        if period == self._period:
            return
        self._period = period
        for k, (_, mod) in enumerate(self._layers):
            mod.grape.seed = layer_seed(self.seed, period, k)

    @property
    def projectors(self) -> dict[str, Projector]:
        """Trainable parameter name -> projector (empty for rank=null)."""
        return dict(self._by_name)

    # -- privatised space and update -------------------------------------------------------------
    def space_shape(self, name: str, param: nn.Parameter) -> torch.Size:
        proj = self._by_name.get(name)
        return param.shape if proj is None else proj.projected_shape

    def space_map(self, name: str, grad: Tensor) -> Tensor:
        """Ghost mode: (Σ_i w_i G_i)·Pᵀ = Σ_i w_i (G_i·Pᵀ), with this step's P. A clipped sum that
        is already projected (book-keeping mode sums the projected per-sample gradients of
        ``ProjectedLinear``) is returned as is; the two shapes never coincide (r < projected dim)."""
        proj = self._by_name.get(name)
        if proj is None or grad.shape == proj.projected_shape:
            return grad
        return proj.project(grad.float())

    def build_optimizer(self, params, optim_cfg) -> torch.optim.Optimizer:
        return GrapeAdam(list(params.values()), dict(self._by_param), lr=float(optim_cfg.lr),
                         betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps),
                         weight_decay=float(optim_cfg.weight_decay))

    def apply_update(self, params, grads, optimizer, step: int) -> None:
        if not isinstance(optimizer, GrapeAdam):
            raise DpftError("method=grape needs its own optimizer (Grape.build_optimizer)")
        for name, p in params.items():
            if name in self._by_name:
                optimizer.projected_grads[p] = grads[name]
            else:
                p.grad = grads[name].to(p.dtype)
        optimizer.step()  # back-projects with this step's P (the one the hooks used)
        optimizer.zero_grad(set_to_none=True)
        self._step = int(step)
        period = self._step // self.refresh  # the next step's period
        if period != self._period:
            self._set_period(period)
            if self.reset_moments:
                optimizer.reset_projected_state()

    # -- diagnostics / state ---------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        """Public constants: fraction of coordinates privatised (noised) vs the full model."""
        return {"noised_dims_frac": self._noised_frac}

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self._step = int(state.get("step", 0))
        self._set_period(self._step // self.refresh)
