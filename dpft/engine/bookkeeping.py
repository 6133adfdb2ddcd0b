"""Book-keeping clipping (`engine.grad_sample_mode=bk`): ghost norms and the clipped sum from ONE
backward pass.

Ghost clipping (Li et al. 2022; Opacus' fast gradient clipping) gets each example's gradient norm
from a layer's input activations A and output gradients B without forming per-sample gradients,
but then runs a second backward of Σ_i w_i·loss_i to get the clipped sum. Book-keeping (Bu et al.
2023, "Differentially private optimization on large model at small cost") keeps A and B from the
first backward instead and forms the clipped sum directly:

* Linear:    Σ_i w_i ∇W_i = Σ_i w_i B_iᵀ A_i  (one matmul with B scaled per example), bias Σ_i w_i ΣB_i;
* Embedding: Σ_i w_i ∇E_i = index_add of w_i·B_i into the rows of example i's token ids
  (rows at ``padding_idx`` get no gradient, as in autograd);
* any other layer with trainable weights (LayerNorm, ...): its per-sample gradients are small
  ([b, d]); they are materialised by Opacus' grad samplers and summed with the weights.

The norms are Opacus' own norm samplers (Linear, Embedding) or the norms of the materialised
per-sample gradients, so the per-sample factors w_i, and therefore the privacy invariant
‖w_i g_i‖ ≤ C, are exactly those of ghost mode; the clipped sum equals ghost's and hooks' to float
tolerance (tests/test_privacy.py). What it trades: it holds every layer's output gradient B until
the step's clipping is done (the activations are held by ghost mode as well), and saves the second
backward pass. Like ghost mode it needs per-example factors that depend on the norm only.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from torch import Tensor, nn

BK_TYPES = (nn.Linear, nn.Embedding)


def _fp32(tensors: list[Tensor]) -> list[Tensor]:
    return [t.float() if t.is_floating_point() else t for t in tensors]


def linear_norm_sample_fp64(layer: nn.Linear, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus' Linear ghost norm ‖Σ_t g_t a_tᵀ‖² = Σ_ts (g_t·g_s)(a_t·a_s), with the Gram matrices
    in float64. PRIVACY FIX: in fp32 the Gram contraction cancels catastrophically when an
    example's per-token terms nearly cancel (error ≈ 1e-7·(Σ_t‖g_t‖‖a_t‖)², not relative to the
    true norm): a crafted example with true norm 27·C got norm 0, factor 1, and entered the sum
    unclipped (tests/test_privacy.py::test_ghost_norm_cancellation_cannot_unclip_an_example)."""
    from opacus.grad_sample.linear import compute_linear_norm_sample

    norms = compute_linear_norm_sample(layer, [activations[0].double()], backprops.double())
    return {p: n.float() for p, n in norms.items()}


# dpft's ghost/bk norm samplers: Opacus' own, with the Linear one in float64 (above)
NORM_SAMPLERS = {**GradSampleHooksFastGradientClipping.NORM_SAMPLERS, nn.Linear: linear_norm_sample_fp64}


class GhostHooks(GradSampleHooksFastGradientClipping):
    """Opacus' ghost-clipping hooks (engine.grad_sample_mode=ghost) with dpft's norm samplers."""

    NORM_SAMPLERS = NORM_SAMPLERS


class BookKeepingHooks(GradSampleHooksFastGradientClipping):
    """Opacus' ghost-clipping hooks that also keep (A, B) of Linear/Embedding layers and the
    per-sample gradients of the other layers, for `clipped_sum`."""

    NORM_SAMPLERS = NORM_SAMPLERS  # float64 Linear ghost norms (linear_norm_sample_fp64)

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, use_ghost_clipping=True, **kw)
        self.kept: list[tuple[nn.Module, list[Tensor], Tensor]] = []
        self.samples: dict[nn.Parameter, Tensor] = {}

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(module=module, backprops=backprops,
                                                             loss_reduction=loss_reduction, batch_first=batch_first)
        if isinstance(module, BK_TYPES) and type(module) in self.NORM_SAMPLERS:
            # norms in fp32 from the kept (possibly bf16) A and B; `clipped_sum` upcasts the same
            # kept values, so the clip factors are exact for what is summed (bf16 autocast too)
            activations, backprops = _fp32(activations), backprops.float()
            for param, ns in self.NORM_SAMPLERS[type(module)](module, activations, backprops).items():
                if param.requires_grad:
                    param._norm_sample = ns
                    param._forward_counter -= 1
            self.kept.append((module, activations, backprops))
        else:
            grad_sampler = self.GRAD_SAMPLERS.get(type(module))
            if grad_sampler is None:
                from opacus.grad_sample.functorch import ft_compute_per_sample_gradient as grad_sampler
            for param, gs in grad_sampler(module, activations, backprops).items():
                if not param.requires_grad:
                    continue
                gs = gs.float()  # the norm and the sum below see the same fp32 numbers
                # a parameter used twice in one forward (tying) accumulates its per-sample gradient
                self.samples[param] = self.samples[param] + gs if param in self.samples else gs
                param._norm_sample = self.samples[param].reshape(len(gs), -1).norm(2, dim=-1)
                param._forward_counter -= 1
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def clipped_sum(self, factors: Tensor, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """Σ_i w_i g_i per trainable parameter (name -> tensor of the parameter's shape) from what
        the last backward kept; then forgets it."""
        names = {p: n for n, p in params.items()}
        out: dict[str, Tensor] = {}

        def add(p: nn.Parameter, value: Tensor) -> None:
            n = names.get(p)
            if n is not None:
                out[n] = out[n] + value if n in out else value

        for module, activations, B in self.kept:
            w = factors.to(B.dtype).view(-1, *([1] * (B.dim() - 1)))
            wB = B * w
            if isinstance(module, nn.Linear):
                A = activations[0]
                if module.weight.requires_grad:
                    add(module.weight, wB.reshape(-1, wB.shape[-1]).T @ A.reshape(-1, A.shape[-1]).to(B.dtype))
                if module.bias is not None and module.bias.requires_grad:
                    add(module.bias, wB.reshape(-1, wB.shape[-1]).sum(0))
            else:  # nn.Embedding
                ids = activations[0].reshape(-1)
                rows = wB.reshape(-1, wB.shape[-1])
                if module.padding_idx is not None:
                    keep = ids != module.padding_idx
                    ids, rows = ids[keep], rows[keep]
                g = torch.zeros_like(module.weight, dtype=B.dtype)
                g.index_add_(0, ids, rows)
                add(module.weight, g)
        for p, gs in self.samples.items():
            add(p, torch.einsum("b,b...->...", factors.to(gs.dtype), gs))
        self.forget()
        return out

    def forget(self) -> None:
        self.kept.clear()
        self.samples.clear()
