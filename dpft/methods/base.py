"""The method interface: how a DP fine-tuning method plugs into dpft's shared engine.

One optimizer step of the engine (`dpft.engine.step.dp_step`) is, for every method:

1. per-sample gradients g_i of the trainable parameters (hooks mode), or only their per-parameter
   norms (ghost mode);
2. per-sample factors w = ``clip_factors(sq_norms)`` and the clipped sum S = Σ_i w_i g_i.
   **Privacy invariant:** for every example i, ‖w_i ⊙ g_i‖₂ ≤ ``sensitivity()``, whatever g_i is;
3. Gaussian noise Z_p ~ N(0, std_p² I) per parameter tensor, std_p = ``noise_std()[name]``
   (on the *sum*);
4. the privatised mean G = (S + Z) / B, B the expected logical batch size (q·N);
5. G' = ``postprocess(G, noise_std_mean, step)`` — sees only G and public quantities (the exact
   per-entry noise std of G, shapes, step), never S, per-sample data or raw examples, so it is
   post-processing and costs no privacy;
6. ``apply_update(params, G', optimizer, step)``: by default p.grad = G' and the optimizer steps.

Steps 2-6 happen in each parameter's *privatised space*, ``space_shape(name, p)``: by default
the parameter's own shape. A method that privatises a data-independent linear image of the
gradient (grape: g ↦ g·Pᵀ) returns that image's shape, makes the per-sample hooks produce
``p.grad_sample`` of shape [b, *space_shape] (``prepare_model``; ghost mode takes the norms of
those and maps the clipped sum with the linear ``space_map``), and maps G' back to the parameter
in ``apply_update``. The invariant of step 2 is then on the image, which is what gets
noised and released.

Accounting: each step the accountant composes one Poisson-subsampled Gaussian mechanism with
noise multiplier ``noise_multiplier()`` (std / sensitivity, or σ_eff for non-uniform noise) and
sample rate q. σ is calibrated once from (ε, δ, q, steps) before training; a method must spend
exactly the calibrated σ (its ``noise_multiplier()`` must equal ``privacy.sigma``), which the
engine checks.

A method is one module in ``dpft/methods/`` registering a subclass with ``@register("name")``,
one config ``dpft/conf/method/<name>.yaml`` (whose ``name`` key selects the class), and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpft.errors import DpftError


@dataclass(frozen=True)
class PrivacyParams:
    """Public quantities fixed before training (none depend on the private data beyond N)."""

    sigma: float  # calibrated noise multiplier σ
    clip_norm: float  # C
    sample_rate: float  # q = B / N
    expected_batch_size: float  # B (logical, expected)
    steps: int  # planned optimizer steps T
    delta: float


class Method:
    """DP-SGD with flat clipping; subclasses override the parts their paper changes."""

    name = "dpsgd"
    private = True
    supports_ghost = True  # factors are a function of the per-sample norm only

    def __init__(self, cfg):
        self.cfg = cfg
        self.privacy: PrivacyParams | None = None
        self.params: dict[str, nn.Parameter] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, model: nn.Module, params: dict[str, nn.Parameter], privacy: PrivacyParams | None) -> None:
        """Called once before training with the trainable parameters (name -> tensor)."""
        self.params = params
        self.privacy = privacy

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Hook to change the model before per-sample hooks are attached (e.g. custom samplers)."""
        return model

    def build_optimizer(self, params: dict[str, nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
        from dpft.optim import build_optimizer

        return build_optimizer(list(params.values()), optim_cfg)

    # -- privatised space ----------------------------------------------------------------------
    def space_shape(self, name: str, param: nn.Parameter) -> torch.Size:
        """Shape in which ``name`` is clipped, noised and post-processed (default: its own). A
        different shape requires per-sample gradients of that shape and an ``apply_update`` that
        maps the privatised result back."""
        return param.shape

    def space_map(self, name: str, grad: Tensor) -> Tensor:
        """Ghost mode: map the clipped sum Σ_i w_i g_i (the parameter's shape) into the privatised
        space. Must be linear and data-independent, so that it equals Σ_i w_i·map(g_i) with the
        w_i computed from the norms of map(g_i). Default: identity."""
        return grad

    def apply_update(self, params: dict[str, nn.Parameter], grads: dict[str, Tensor],
                     optimizer: torch.optim.Optimizer, step: int) -> None:
        """Step 6: hand the post-processed privatised gradient (in ``space_shape``) to the
        optimizer. Only privatised tensors and public numbers reach this point."""
        for name, p in params.items():
            p.grad = grads[name].to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- 2. per-sample rule --------------------------------------------------------------------
    def sensitivity(self) -> float:
        """L2 bound on one example's contribution to the clipped sum S."""
        return self.privacy.clip_norm

    def clip_factors(self, sq_norms: Tensor) -> Tensor:
        """Per-sample factors from per-parameter squared norms ``sq_norms`` [P, b].

        Returns [b] (one factor per example, required in ghost mode) or [P, b] (per-parameter
        factors, hooks mode only). Flat clipping: w_i = min(1, C / ‖g_i‖)."""
        norms = sq_norms.sum(0).sqrt()
        return clip_flat(norms, self.privacy.clip_norm)

    # -- 3. noise ------------------------------------------------------------------------------
    def noise_std(self) -> dict[str, float]:
        """Std of the Gaussian noise added to each parameter's clipped *sum*: σ · sensitivity."""
        std = self.privacy.sigma * self.sensitivity()
        return {name: std for name in self.params}

    def noise_multiplier(self) -> float:
        """What the accountant composes each step: noise std / sensitivity (σ_eff)."""
        return self.privacy.sigma

    # -- 5. post-processing ---------------------------------------------------------------------
    def postprocess(self, grads: dict[str, Tensor], noise_std: dict[str, float], step: int) -> dict[str, Tensor]:
        """Map the privatised mean gradient to the update direction. ``noise_std`` is the exact
        per-entry std of the noise in each ``grads[name]``. Return the same tensor object for
        parameters left unchanged."""
        return grads

    # -- diagnostics -----------------------------------------------------------------------------
    #: True when `diagnostics()` reads non-private quantities (per-sample norms, the clipped sum):
    #: the engine then logs them under `train/method/` (non-private, dropped with
    #: diagnostics.nonprivate=false) instead of `method/` (DP outputs only)
    nonprivate_diagnostics = False

    def diagnostics(self) -> dict[str, float]:
        """Scalars logged at every step. They go to the logs only and never feed back into training.
        Unless `nonprivate_diagnostics` is set they must be functions of privatised gradients and
        public numbers alone, since they are published as DP outputs."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NonPrivate(Method):
    """Plain fine-tuning: no per-sample work, no noise, no accounting (ε = ∞)."""

    name = "nonprivate"
    private = False

    def sensitivity(self) -> float:
        return float("inf")

    def noise_std(self) -> dict[str, float]:
        return {name: 0.0 for name in self.params}

    def noise_multiplier(self) -> float:
        return 0.0


def cfg_get(node, key, default):
    """``node.key`` of a method config (DictConfig, dict or object), ``default`` when absent/null."""
    if node is None:
        return default
    try:
        value = node.get(key, default)
    except AttributeError:
        value = getattr(node, key, default)
    return default if value is None else value


def cfg_number(node, key, default, full_key: str | None = None) -> float:
    """A finite number from a method config, or a one-line DpftError naming ``full_key``."""
    full_key = full_key or f"method.{key}"
    value = cfg_get(node, key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        value = float(value)
    except (TypeError, ValueError):
        raise DpftError(f"{full_key} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise DpftError(f"{full_key} must be finite, got {value}")
    return value


def cfg_bool(node, key, default: bool) -> bool:
    value = cfg_get(node, key, default)
    if not isinstance(value, bool):
        raise DpftError(f"method.{key} must be true or false, got {value!r}")
    return value


def cfg_choice(node, key, default: str, choices) -> str:
    """One of ``choices`` from a method config, or a one-line DpftError listing them."""
    value = str(cfg_get(node, key, default))
    if value not in choices:
        raise DpftError(f"method.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def clip_flat(norms: Tensor, clip_norm: float) -> Tensor:
    """min(1, C/‖g‖), with ‖g‖ = 0 mapped to factor 1 and non-finite norms rejected."""
    if not torch.isfinite(norms).all():
        raise DpftError(
            "non-finite per-sample gradient norm (NaN/inf loss or gradient); lower the learning rate "
            "or check the data — dpft never clips a non-finite gradient into the privatised sum"
        )
    return (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


_REGISTRY: dict[str, type[Method]] = {"dpsgd": Method, "nonprivate": NonPrivate}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def _import_all() -> None:
    import importlib
    import pkgutil
    from pathlib import Path

    # the folder, not `import dpft.methods`: that package's __init__ imports this module
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "base":
            importlib.import_module(f"dpft.methods.{mod.name}")


def build_method(cfg) -> Method:
    name = cfg.method.name
    if name not in _REGISTRY:
        _import_all()
    if name not in _REGISTRY:
        raise DpftError(f"unknown method '{name}'; valid choices: {', '.join(available())}")
    return _REGISTRY[name](cfg)
