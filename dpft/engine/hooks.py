"""Per-sample gradient machinery for `engine.grad_sample_mode` (dpft/engine/step.py uses it):
``hooks`` materialises every example's gradient (Opacus' GradSampleHooks); ``ghost`` and ``bk``
take per-sample norms from activations and backprops (dpft/engine/bookkeeping.py: float64 norms
with rigorous rounding-error bounds). Which modes a config and method may use is decided in one
place, `dpft.config.grad_sample_refusal`."""

from __future__ import annotations

from dpft.errors import DpftError


def attach_hooks(model, mode: str, clip_norm: float):
    """Opacus per-sample machinery attached *without wrapping* the model, so HF methods and
    attribute access keep working. `cleanup()` on the result removes it."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DpftError(f"model has layers DP training cannot handle: {errors[0]}")
    if mode == "hooks":
        return GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    from dpft.engine.bookkeeping import ClipHooks, check_hooked_gradients

    check_hooked_gradients(model)  # refuse weights that get gradient outside their hooked call
    return ClipHooks(model, batch_first=True, loss_reduction="sum", strict=False, max_grad_norm=clip_norm)
