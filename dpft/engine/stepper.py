"""`Stepper`: the one way to build and take a training step, used by the loop
(dpft/engine/train.py), `dpft bench` and the tests.

Built from a model, a method and the config, in this order: ``method.prepare_model`` →
``method.setup`` (with the public privacy parameters) → the method's optimizer → the learning-rate
schedule → per-sample hooks (``attach``, for DP methods). Each ``step(chunks, t)`` is the method's
`dp_step` with step t's noise (or `nonprivate_step`), then the schedule. The step itself stays a
plain function (dpft/engine/step.py); the stepper only composes it.

Checks made here, once: the configured `engine.grad_sample_mode` must suit the method and the
precision (`dpft.config.grad_sample_refusal`), and the method must spend exactly the calibrated σ
(its ``noise_multiplier()`` is what the accountant composes).

Privacy: the noise of step t is ``noise.for_step(t)`` of the run's `NoiseSource`
(dpft/engine/noise.py: keyed by a secret, never by the public seed unless privacy.noise=seeded).
"""

from __future__ import annotations

import torch

from dpft.config import grad_sample_refusal
from dpft.engine.hooks import attach_hooks
from dpft.engine.memory import retain_freed_memory
from dpft.engine.step import Batch, dp_step, nonprivate_step
from dpft.errors import DpftError
from dpft.methods import PrivacyParams
from dpft.optim import build_schedule


class Stepper:
    """A model, its method, optimizer, schedule, per-sample hooks and noise, ready to step.

    `privacy` are the public parameters a DP method is set up with (None for a non-private one);
    `steps` is the planned step count (the schedule's length); `noise` the run's
    `dpft.engine.noise.NoiseSource`; `dist` the data-parallel group, if any. The model is put in
    training mode. Hooks are attached by `attach` (separately, because a resumed run first loads
    its state and RNG: attaching the ghost/bk hooks runs a forward/backward that draws dropout)."""

    def __init__(self, model: torch.nn.Module, method, cfg, *, privacy: PrivacyParams | None, steps: int,
                 noise=None, dist=None):
        if method.private:
            refused = grad_sample_refusal(cfg, method)
            if refused:
                raise DpftError(refused)
        self.method, self.noise, self.dist = method, noise, dist
        retain_freed_memory()  # dpft/engine/memory.py: a step reuses the last one's pages
        self.mode = str(cfg.engine.grad_sample_mode)
        model.train()
        self.model = method.prepare_model(model)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        method.setup(self.model, self.params, privacy)
        self.privacy = privacy
        self.optimizer = method.build_optimizer(self.params, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.train, steps)
        if method.private and abs(method.noise_multiplier() - privacy.sigma) > 1e-9 * max(1.0, privacy.sigma):
            raise DpftError(f"method {method.name} spends σ_eff={method.noise_multiplier()} but σ={privacy.sigma} was calibrated")
        self.hooks = None

    def attach(self) -> "Stepper":
        """Attach the per-sample hooks of `engine.grad_sample_mode` (DP methods only)."""
        if self.method.private and self.hooks is None:
            self.hooks = attach_hooks(self.model, self.mode, self.privacy.clip_norm)
        return self

    def step(self, chunks: list[Batch], t: int, *, alignment: bool = False, per_layer: bool = False,
             noise=None) -> dict:
        """Optimizer step t over the logical batch `chunks`; returns the step's (non-private)
        statistics. `noise` replaces the run's draws for this step (a `StepNoise` or a
        torch.Generator, as `dp_step` takes): for measuring the step itself."""
        if self.method.private:
            if self.hooks is None:
                raise DpftError("Stepper.step before attach(): no per-sample hooks")
            draws = noise if noise is not None else self.noise.for_step(t)
            stats = dp_step(model=self.model, chunks=chunks, method=self.method, params=self.params,
                            optimizer=self.optimizer, noise_generator=draws, mode=self.mode, hooks=self.hooks,
                            step=t, alignment=alignment, per_layer=per_layer, dist=self.dist)
        else:
            stats = nonprivate_step(model=self.model, chunks=chunks, params=self.params, optimizer=self.optimizer)
        self.schedule.step()
        return stats

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def state_dict(self) -> dict:
        """The trainable weights, optimizer, schedule and method state (checkpoint keys)."""
        return {"model": {k: v.detach().cpu() for k, v in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["model"].items():
                self.params[name].copy_(value.to(self.params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.method.load_state_dict(state["method"])

    def close(self) -> None:
        """Remove the hooks (the model is usable without them afterwards)."""
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
