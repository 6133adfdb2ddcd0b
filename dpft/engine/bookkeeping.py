"""Per-sample clipping without per-sample gradients (`engine.grad_sample_mode=bk` and `ghost`), with a
clipped sum whose per-example bound ‖w_i·ĝ_i‖ ≤ C is proven for the floating-point numbers released.

Ghost clipping (Li et al. 2022; Opacus' fast gradient clipping) gets each example's gradient norm
from a layer's input activations A and output gradients B without forming per-sample gradients.
Book-keeping (Bu et al. 2023, "Differentially private optimization on large model at small cost")
keeps A and B from the same backward and forms the clipped sum directly:

* Linear:    Σ_i w_i ∇W_i = Σ_i w_i B_iᵀ A_i  (one matmul with B scaled per example), bias Σ_i w_i ΣB_i;
* Embedding: Σ_i w_i ∇E_i = index_add of w_i·B_i into the rows of example i's token ids
  (rows at ``padding_idx`` get no gradient, as in autograd);
* any other layer with trainable weights (LayerNorm, grape's ProjectedLinear, ...): its per-sample
  gradients are small ([b, d]); they are materialised by Opacus' grad samplers and summed with the weights.

`ClipHooks` does both; ghost mode (dpft/engine/step.py) runs Opacus' second backward of Σ w_i·loss_i and
forms the clipped sum from *that* backward's kept (A, B'), re-measured (see below).

**Why the norms alone do not bound what is released, and what does** (issue 16.3). The fp32 contraction
Σ_{i,t} w_i b_it a_itᵀ has a rounding error that scales with the per-token terms Σ_t ‖b_t‖‖a_t‖, not with
the example's true norm ‖Σ_t b_t a_tᵀ‖: an example whose token terms nearly cancel (true norm 27·C in
tests/test_privacy.py) contributed 1.18·C through the bk contraction and 1.98·C through ghost's second
backward even with exact norms. The bound used here, per example i and parameter p:

  Backward error of a conventional fp32 GEMM/reduction (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., §3.1 eq. 3.4–3.5: fl(Σ_k x_k) = Σ_k x_k(1+θ_k), |θ_k| ≤ γ_{n−1}, in ANY summation
  order, FMA or not; γ_k = k·u / (1 − k·u)). Each entry of the computed sum is Σ_{i,t} w_i·b_itj·a_itl·(1+θ)
  with |θ| ≤ γ_{n+1} (n = rows of the contraction, +1 for the rounding of w_i·b, +1 for the product), so the
  released sum is EXACTLY Σ_i w_i (g_i + e_i), g_i = B_iᵀA_i in exact arithmetic of the stored A, B, and
  ‖e_i‖_F ≤ γ_{n+1} ‖Σ_t |b_t||a_t|ᵀ‖_F ≤ γ_{n+1} S_i,  S_i = Σ_t ‖b_t‖‖a_t‖  (bias: Σ_t ‖b_t‖; Embedding
  rows: Σ_t ‖b_t‖; a materialised per-sample gradient G_i summed with an einsum over b: γ_{b+1}‖Ĝ_i‖).
  The norm n_i = ‖g_i‖ is computed from the same stored values by the Gram form Σ_ts (b_t·b_s)(a_t·a_s):
  the Gram matrices in fp32 (each entry within γ_d·‖x_t‖‖x_s‖, Higham eq. 3.5 and Cauchy–Schwarz), their
  T² products (exact in float64) and sum in float64. The error of n̂² is bounded per example from the
  computed Grams themselves: ≤ γ_{d_in+1}·āᵀ|Ĥ|ā + γ_{d_out+1}·b̄ᵀ|Ĝ|b̄ + (γγ + γ⁶⁴_{T²+2}(1+γ)²)·S² (`_gram_norm`;
  ā, b̄ per-token norm bounds), at most the Cauchy–Schwarz κ·S² (to first order in u) and ≈ κ·n² when the
  tokens are not aligned; n ≤ √(n̂² + that). An example for which it is still loose (> 1e-3·n̂: cancelling tokens) is
  recomputed with float64 Grams. A bias's norm is ‖Σ_t b_t‖ of the fp32 token sum (error ≤ γ_T·Σ_t‖b_t‖).

So ‖w_i (g_i + e_i)‖ ≤ w_i·√Σ_p (n_ip + δ_ip + E_ip)², δ the norm's error bound, E the contraction's. The
engine (step.py, `bounded_sq_norms`) hands the method these *inflated* per-parameter norms, inflated once
more by (1 + γ_{P+m+8}) for the fp32 arithmetic of the factor (P parameters' sum, sqrt, division, cast) and
the accumulation over m micro-batches (each a relative (1+θ) per entry); its slack (≥ 2⁻²⁴) also covers the few
float64 roundings (2⁻⁵³ each) in forming n̂ + δ. Every method's factor satisfies
w(x)·x ≤ sensitivity for every x (its own invariant, dpft/methods/base.py), so at the inflated norm the
released contribution is ≤ sensitivity: exactly, on every machine, thread count and BLAS (only
conventional O(n³) products are assumed — no Strassen — with u taken from torch's fp32 matmul precision:
2⁻²⁴ at "highest", 2⁻⁸ otherwise, which covers TF32 and bf16 inner products).

Cost: the inflation is ≈ γ_{n+1}·S_i/n_i + κ(S_i/n_i)²/2 relative, a few 1e-4 for ordinary examples
(S/n ≈ 3 on MiniLM, benchmarks/ghost_norm_error.py) — the clipped gradient moves by that, not by a
percent; only an example whose token terms cancel is shrunk materially (as it must be). Computing S_i
is one pass over A and B (docs/benchmarks.md, section 9).

What this does not cover (stated, not solved): the noise addition s + z and the mean (s + z)/B round in
fp32 (Mironov 2012's floating-point caveat, issue 16.1), and the other examples' rounding terms θ depend
on the batch they sit in.

**Non-finite examples** (issue 16.5): an example whose loss, activations, output gradients or norm is
NaN/inf gets factor 0 and its rows are *masked* (torch.where) out of every contraction — never
multiplied by 0, since 0·inf = NaN — so it contributes exactly nothing and the step goes on.

**Gradients outside hooked calls** (issue 16.6): the hooks see a parameter only through its module's call.
`check_hooked_gradients` compares, on a synthetic batch at attach time, autograd's gradient with the
hooks' sum and refuses a model where they differ (a weight also read directly, a bare nn.Parameter).
"""

from __future__ import annotations

import math

import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from torch import Tensor, nn

from dpft.errors import DpftError

BK_TYPES = (nn.Linear, nn.Embedding)
U64 = 2.0 ** -53


def unit_roundoff(device: torch.device | None = None) -> float:
    """u of the fp32 products the clipped sum is formed with: 2⁻²⁴, unless torch is allowed to run fp32
    matmuls at reduced precision (TF32 / bf16 passes), then 2⁻⁸ (bf16's, an upper bound for both)."""
    reduced = torch.get_float32_matmul_precision() != "highest"
    if device is not None and device.type == "cuda":
        reduced = reduced or torch.backends.cuda.matmul.allow_tf32
    return 2.0 ** -8 if reduced else 2.0 ** -24


def gamma(k: float, u: float) -> float:
    """Higham's γ_k = k·u / (1 − k·u); inf when k·u ≥ 1 (no bound)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


def _fp32(tensors: list[Tensor]) -> list[Tensor]:
    return [t.float() if t.is_floating_point() else t for t in tensors]


def _rows_finite(x: Tensor) -> Tensor:
    return torch.isfinite(x.reshape(len(x), -1)).all(1) if x.is_floating_point() else torch.ones(
        len(x), dtype=torch.bool, device=x.device)


def _mask_rows(x: Tensor, keep: Tensor) -> Tensor:
    """x with the rows of masked examples replaced by exact zeros (torch.where: no 0·inf = NaN)."""
    if not x.is_floating_point():
        return x
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


class GramCache:
    """Gram matrices X·Xᵀ [b, T, T] (fp32 products, returned in float64) and per-token norm bounds [b, T] of
    tensors seen in this backward, by storage: Q, K and V read the same activations; word/position/type
    embeddings get the same output gradient. Each entry holds its tensor, so no other tensor can take its
    address while cached; `clear` after each micro-batch."""

    def __init__(self):
        self._d: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _get(self, kind: str, x: Tensor, make) -> Tensor:
        key = (kind, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        hit = self._d.get(key)
        if hit is None:
            hit = self._d[key] = (x, make(x))
        return hit[1]

    def gram(self, x: Tensor) -> Tensor:
        return self._get("gram", x, lambda x: torch.bmm(x, x.transpose(1, 2)).double())

    def abs_gram(self, x: Tensor) -> Tensor:
        return self._get("abs", x, lambda x: self.gram(x).abs())

    def token_norms(self, x: Tensor) -> Tensor:
        return self._get("norms", x, _token_norms)

    def clear(self) -> None:
        self._d.clear()


def _token_norms(x: Tensor) -> Tensor:
    """Upper bounds on the per-token norms ‖x_t‖ [b, T] (fp32 norm of d terms, times 1 + γ_{d+3})."""
    return x.norm(dim=-1).double() * (1.0 + gamma(x.shape[-1] + 3, 2.0 ** -24))


def _quad(M: Tensor, v: Tensor) -> Tensor:
    """vᵀ M v per example: M [b, T, T], v [b, T] (float64)."""
    return (torch.bmm(M, v.unsqueeze(-1)).squeeze(-1) * v).sum(-1)


def _gram64(x: Tensor) -> Tensor:
    x = x.double()
    return torch.bmm(x, x.transpose(1, 2))


def _gram_norm(G: Tensor, H: Tensor, absG, absH, an: Tensor, bn: Tensor, g_a: float, g_b: float, d: int,
               exact64) -> tuple[Tensor, Tensor]:
    """(n̂, δ ≥ |n − n̂|) for n² = Σ_ts G_ts·H_ts, from computed Gram matrices Ĝ = `G`, Ĥ = `H` [b, T, T] (fp32
    values held in float64; `absG()`, `absH()` give their absolute values) whose entries are within g_a·ā_tā_s
    and g_b·b̄_tb̄_s of the exact ones (`an` = ā, `bn` = b̄ [b, T]: per-token norm bounds; g = 0 for an exact
    matrix such as an Embedding's id mask).

    Error (module docstring): ĜĤ − GH = (Ĝ − G)∘Ĥ + G∘(Ĥ − H) and |G| ≤ |Ĝ| + g_a·āāᵀ, so
      |Σ_ts Ĝ_tsĤ_ts − n²| ≤ g_a·āᵀ|Ĥ|ā + g_b·b̄ᵀ|Ĝ|b̄ + g_a·g_b·S²,   S = Σ_t ā_t b̄_t;
    the products Ĝ_tsĤ_ts of two fp32 numbers are exact in float64 and their sum is within
    γ⁶⁴_{T²+2}·Σ|Ĝ_tsĤ_ts| ≤ γ⁶⁴_{T²+2}·(1 + g_a)(1 + g_b)·S²; the error terms themselves are float64 sums of
    non-negative terms, taken with a relative (1 + 2γ⁶⁴_{T²+8}). To first order this is never larger than
    the Cauchy–Schwarz form (g_a + g_b)·S² that |Ĥ_ts| ≤ b̄_tb̄_s gives, and for examples whose tokens are
    not aligned (|Ĥ_ts| ≪ b̄_tb̄_s off the diagonal) it is ≈ (g_a + g_b)·n² instead: such examples no
    longer pay for float64. An example whose bound is still loose (δ > 1e-3·n̂: per-token terms that nearly
    cancel) is recomputed with float64 Grams (`exact64(index)` -> their [k, T, T] product, error
    γ⁶⁴_{d+T²+2}·S²)."""
    P = G * H
    t2 = P.shape[1] * P.shape[2]
    S = (an * bn).sum(1)
    err = (gamma(t2 + 2, U64) * (1.0 + g_a) * (1.0 + g_b) + g_a * g_b) * S * S
    if g_a:
        err = err + g_a * _quad(absH(), an)
    if g_b:
        err = err + g_b * _quad(absG(), bn)
    err = err * (1.0 + 2.0 * gamma(t2 + 8, U64))
    ga = P.sum((1, 2)).clamp_min(0)
    n = ga.sqrt()
    delta = (ga + err).sqrt() - n
    loose = (delta > 1e-3 * n).nonzero().squeeze(1)
    if len(loose):
        g = exact64(loose).sum((1, 2)).clamp_min(0)
        n[loose] = g.sqrt()
        delta[loose] = (g + gamma(d + t2 + 2, U64) * S[loose] ** 2).sqrt() - n[loose]
    return n, delta


def linear_norms(A: Tensor, B: Tensor, weight: bool, bias: bool, cache: GramCache) -> dict[str, tuple[Tensor, Tensor]]:
    """{"weight"/"bias": (n̂ [b] float64, bound [b] float64)} for a Linear layer: n̂ the per-sample gradient
    norm of the stored fp32 A [b, (T,) d_in] and B [b, (T,) d_out], bound ≥ |n − n̂| + ‖e_i‖ (module
    docstring), e_i the fp32 contraction's error over this layer's b·T rows.

    Weight: the Gram form ‖Σ_t b_t a_tᵀ‖² = Σ_ts (b_t·b_s)(a_t·a_s) (fp32 Gram matrices — the costly
    products — then the T² products and their sum in float64, where the catastrophic cancellation happens;
    error bound in `_gram_norm`). Bias: ‖Σ_t b_t‖ of the fp32 token sum, within γ_{T}·Σ_t‖b_t‖ of exact —
    linear in the rounding, where its Gram form would be within √(γ_d)·Σ_t‖b_t‖."""
    out = {}
    if B.dim() == 2:
        A, B = A.unsqueeze(1), B.unsqueeze(1)
    b, t, d_out = B.shape
    d_in = A.shape[-1]
    u = unit_roundoff(B.device)
    bn = cache.token_norms(B)  # [b, T]
    contraction = gamma(b * t + 2, u)
    if weight:
        an = cache.token_norms(A)
        S = (bn * an).sum(1)
        if t == 1:  # one token: ‖b aᵀ‖ = ‖b‖‖a‖
            n = B.double().squeeze(1).norm(dim=1) * A.double().squeeze(1).norm(dim=1)
            delta = gamma(d_in + d_out + 4, U64) * S
        else:
            n, delta = _gram_norm(cache.gram(A), cache.gram(B), lambda: cache.abs_gram(A), lambda: cache.abs_gram(B),
                                  an, bn, gamma(d_in + 1, u), gamma(d_out + 1, u), d_in + d_out,
                                  lambda i: _gram64(B[i]) * _gram64(A[i]))
        out["weight"] = (n, delta + contraction * S)
    if bias:
        Sb = bn.sum(1)
        # the fp32 sum over T tokens is Σ_t b_t(1 + θ_t), |θ| ≤ γ_{T−1}; its float64 norm is within γ⁶⁴_{d+2}
        nb = B.sum(1).double().norm(dim=1)
        db = gamma(t, u) * Sb + 2.0 * gamma(d_out + 4, U64) * nb
        out["bias"] = (nb, db + contraction * Sb)
    return out


def embedding_norms(ids: Tensor, B: Tensor, cache: GramCache) -> tuple[Tensor, Tensor]:
    """Per-sample norm of an Embedding's gradient, ‖Σ_t e_{id_t} b_tᵀ‖² = Σ_ts [id_t = id_s] (b_t·b_s) from
    the Gram matrix (as `linear_norms`; the id mask is exact, ‖e_{id}‖ = 1), with its bound. Rows at
    padding_idx are counted in n̂ (an over-estimate: the released sum leaves them out)."""
    B = B.reshape(len(B), -1, B.shape[-1])
    ids = ids.reshape(len(B), -1)
    t = B.shape[1]
    bn = cache.token_norms(B)
    Sb = bn.sum(1)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).double()
    n, delta = _gram_norm(same, cache.gram(B), lambda: same, lambda: cache.abs_gram(B), torch.ones_like(bn), bn, 0.0,
                          gamma(B.shape[-1] + 1, unit_roundoff(B.device)), B.shape[-1], lambda i: _gram64(B[i]) * same[i])
    return n, delta + gamma(len(B) * t + 2, unit_roundoff(B.device)) * Sb


class ClipHooks(GradSampleHooksFastGradientClipping):
    """Opacus' ghost-clipping hooks with float64 norms and rigorous error bounds (module docstring).

    After a backward each trainable parameter p carries ``p._norm_sample`` (n̂ [b], float64) and
    ``p._norm_bound`` (δ + E [b], float64). With ``keep`` set (bk mode, and ghost's second backward)
    the hooks also keep (A, B) of Linear/Embedding layers and the per-sample gradients of the other
    layers, for `clipped_sum`; with ``hold`` (ghost's first backward) they leave the activations in place
    for the second. With ``skip_weight_grads`` (bk mode) the forward runs nn.Linear layers whose input
    already needs a gradient with their parameters detached, so autograd does not form the unclipped
    weight gradient that book-keeping discards anyway (a GEMM as large as the clipped contraction that
    replaces it)."""

    NORM_SAMPLERS = {nn.Linear: None, nn.Embedding: None}  # Opacus' dispatch table; ours is below

    def __init__(self, model: nn.Module, *, keep: bool = False, skip_weight_grads: bool = False, **kw):
        super().__init__(model, use_ghost_clipping=True, **kw)
        self.keep, self.hold, self.skip_weight_grads = keep, False, skip_weight_grads
        self.kept: list[tuple[nn.Module, list[Tensor], Tensor]] = []
        self.samples: dict[nn.Parameter, Tensor] = {}
        self.grams = GramCache()
        self._trainable = {id(p) for p in model.parameters() if p.requires_grad}
        self._modules_seen = [m for m in model.modules()
                              if any(id(p) in self._trainable for p in m.parameters(recurse=False))]
        self._hooked = set(map(id, self._modules_seen))
        self._detached: list[nn.Module] = []
        for m in self._modules_seen:
            if type(m) is nn.Linear:
                self.autograd_grad_sample_hooks.append(m.register_forward_pre_hook(self._detach_pre_hook))

    # -- bk: let autograd skip the unclipped weight gradient of Linear layers ----------------------
    def _detach_pre_hook(self, module, inputs):
        if (self.skip_weight_grads and self.hooks_enabled and module.training and torch.is_grad_enabled()
                and inputs and isinstance(inputs[0], Tensor) and inputs[0].requires_grad):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            self._detached.append(module)

    def restore_requires_grad(self) -> None:
        """Undo the forward's detaching (the engine calls it after each backward, and on errors)."""
        for m in self._detached:
            for p in m.parameters(recurse=False):
                if id(p) in self._trainable:
                    p.requires_grad_(True)
        self._detached.clear()

    def _params(self, module) -> list[nn.Parameter]:
        return [p for p in module.parameters(recurse=False) if id(p) in self._trainable]

    def capture_activations_hook(self, module, forward_input, _forward_output):
        if id(module) not in self._hooked or not module.training or not torch.is_grad_enabled() \
                or not self.hooks_enabled:
            return
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([t.detach() for t in forward_input])
        for p in self._params(module):
            p._forward_counter += 1
            if p._forward_counter > 1 and type(module) in BK_TYPES:
                raise DpftError("a trainable Linear/Embedding is called twice in one forward (tied weights): "
                                "ghost/bk clipping cannot handle it; use engine.grad_sample_mode=hooks")

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        if not self.hooks_enabled:
            return
        with torch.profiler.record_function(f"dpft::norms::{type(module).__name__}"):
            self._capture(module, forward_output, loss_reduction, batch_first)

    def _capture(self, module, forward_output, loss_reduction, batch_first):
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(module=module, backprops=backprops,
                                                             loss_reduction=loss_reduction, batch_first=batch_first)
        if self.hold:  # ghost's first backward: the second one needs the same activations
            module.activations.insert(0, activations)
        params = self._params(module)
        if type(module) in BK_TYPES:
            # norms from the kept (possibly bf16) A and B upcast to fp32: `clipped_sum` sums the same values
            activations, backprops = _fp32(activations), backprops.float()
            if type(module) is nn.Linear:
                want = {"weight": module.weight, "bias": module.bias}
                norms = linear_norms(activations[0], backprops, *(want[k] is not None and id(want[k]) in self._trainable
                                                                  for k in ("weight", "bias")), self.grams)
                norms = {want[k]: v for k, v in norms.items()}
            else:
                norms = {module.weight: embedding_norms(activations[0], backprops, self.grams)} if params else {}
            for param, (n, bound) in norms.items():
                param._norm_sample, param._norm_bound = n, bound
            if self.keep:
                self.kept.append((module, activations, backprops))
        else:
            grad_sampler = self.GRAD_SAMPLERS.get(type(module))
            if grad_sampler is None:
                from opacus.grad_sample.functorch import ft_compute_per_sample_gradient as grad_sampler
            for param, gs in grad_sampler(module, activations, backprops).items():
                if id(param) not in self._trainable:
                    continue
                gs = gs.float()  # the norm and the sum below see the same fp32 numbers
                # a parameter used twice in one forward (tying) accumulates its per-sample gradient
                gs = self.samples[param] + gs if param in self.samples else gs
                self.samples[param] = gs
                n = gs.reshape(len(gs), -1).double().norm(dim=-1)
                # float64 norm of d fp32 values (relative γ⁶⁴_d); einsum over b in fp32 (relative γ_{b+1})
                param._norm_sample = n
                param._norm_bound = (gamma(gs[0].numel() + 2, U64) + gamma(len(gs) + 2, unit_roundoff(gs.device))) * n
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    def clipped_sum(self, factors: Tensor, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """Σ_i w_i g_i per trainable parameter (name -> tensor of the parameter's shape) from what
        the last backward kept; examples with w_i = 0 are masked out (exact zeros, whatever their
        A and B hold); then forgets it."""
        with torch.profiler.record_function("dpft::clipped_sum"):
            return self._clipped_sum(factors, params)

    def _clipped_sum(self, factors: Tensor, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        names = {id(p): n for n, p in params.items()}
        out: dict[str, Tensor] = {}
        keep = factors > 0

        def add(p, value: Tensor) -> None:
            n = names.get(id(p)) if p is not None else None
            if n is not None:
                out[n] = out[n] + value if n in out else value

        everyone = bool(keep.all())
        for module, activations, B in self.kept:
            w = factors.to(B.dtype).view(-1, *([1] * (B.dim() - 1)))
            Bk = B if everyone else _mask_rows(B, keep)
            if isinstance(module, nn.Linear):
                A = activations[0].to(B.dtype)
                A = A if everyone else _mask_rows(A, keep)
                if id(module.weight) in names:
                    # Σ_i w_i B_iᵀA_i with w folded into the narrower side (one rounding either way)
                    lhs, rhs = (Bk, A * w) if A.shape[-1] < B.shape[-1] else (Bk * w, A)
                    add(module.weight, lhs.reshape(-1, lhs.shape[-1]).T @ rhs.reshape(-1, rhs.shape[-1]))
                if module.bias is not None and id(module.bias) in names:  # Σ_{i,t} w_i b_it as one GEMV
                    rows = Bk.reshape(-1, B.shape[-1])
                    add(module.bias, w.reshape(-1).repeat_interleave(len(rows) // len(w)) @ rows)
            else:  # nn.Embedding
                ids = activations[0].reshape(-1)
                rows = (Bk * w).reshape(-1, B.shape[-1])
                if module.padding_idx is not None:
                    sel = ids != module.padding_idx
                    ids, rows = ids[sel], rows[sel]
                g = torch.zeros_like(module.weight, dtype=B.dtype)
                g.index_add_(0, ids, rows)
                add(module.weight, g)
        for p, gs in self.samples.items():
            add(p, torch.einsum("b,b...->...", factors.to(gs.dtype), _mask_rows(gs, keep)))
        self.forget()
        return out

    def forget(self) -> None:
        """Drop everything per-sample of the current micro-batch (also after an error mid-step)."""
        self.kept.clear()
        self.samples.clear()
        self.grams.clear()
        for m in self._modules_seen:
            if getattr(m, "activations", None):
                m.activations.clear()
            if hasattr(m, "max_batch_len"):
                del m.max_batch_len
            for p in self._params(m):
                p._forward_counter = 0

    def cleanup(self):
        self.restore_requires_grad()
        super().cleanup()
        for p in self._module.parameters():
            if hasattr(p, "_norm_bound"):
                del p._norm_bound


def bounded_sq_norms(params: dict[str, nn.Parameter], n_chunks: int) -> tuple[Tensor, Tensor]:
    """([P, b] fp32 squared per-parameter norms inflated by their error bounds, [b] bool finite) from the
    hooks' last backward; clears the per-sample attributes. A method's factors at these norms bound the
    released contribution (module docstring); non-finite examples get 0 here and are for the engine to
    zero out."""
    ns, bounds = [], []
    for name, p in params.items():
        if getattr(p, "_norm_sample", None) is None:
            raise DpftError(f"no per-sample norm for {name}: the layer is unused or unsupported")
        ns.append(p._norm_sample)
        bounds.append(p._norm_bound)
        p._norm_sample = p._norm_bound = None  # per-sample quantities must not outlive the clipping
    n, e = torch.stack(ns).double(), torch.stack(bounds).double()
    x = n + e
    finite = torch.isfinite(x).all(0)
    rho = gamma(len(params) + n_chunks + 8, unit_roundoff(x.device))
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)) * (1.0 + rho)
    return x.pow(2).float(), finite


def check_hooked_gradients(model: nn.Module) -> None:
    """Refuse a model in which a trainable parameter gets gradient outside its hooked module call (issue
    16.6): one forward/backward on a synthetic (public) batch with temporary hooks, autograd's gradient
    against the hooks' Σ_i g_i. A weight also read directly (or a bare nn.Parameter) shows as a difference
    far above rounding; ghost mode would otherwise release that part unclipped (bk would drop it). Half-
    precision models are probed on a float32 copy, where rounding is far below the 1e-3 threshold. The
    model, its gradients and the RNG state are left as they were, so training is unchanged."""
    import copy

    from dpft.models import model_inputs

    if not any(p.requires_grad for p in model.parameters()):
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None or not hasattr(model, "config"):
        return  # not a model dpft trains (they all embed token ids)
    probe = model
    if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters() if p.requires_grad):
        probe = copy.deepcopy(model).float()
    params = {n: p for n, p in probe.named_parameters() if p.requires_grad}
    device = next(iter(params.values())).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.num_embeddings, (3, 2), generator=g).to(device)  # tiny: any model takes 2 tokens
    was_training = probe.training
    saved = {n: p.grad for n, p in params.items()}
    hooks = ClipHooks(probe, keep=True, batch_first=True, loss_reduction="sum", strict=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probe.train()
            for p in params.values():
                p.grad = None
            logits = probe(**model_inputs(probe, ids, torch.ones_like(ids))).logits.float()
            (logits * torch.randn(logits.shape, generator=g).to(device)).sum().backward()
            ours = hooks.clipped_sum(torch.ones(len(ids), device=device), params)
            pairs = {}
            for name, p in params.items():
                ref = p.grad if p.grad is not None else torch.zeros_like(p)
                mine = ours.get(name, torch.zeros_like(ref)).to(ref.dtype)
                if mine.shape == ref.shape:  # else a method's projected per-sample gradients (grape): not comparable
                    pairs[name] = (ref.double(), mine.double())
            # gradients that vanish mathematically (key biases: softmax is shift-invariant) are pure
            # rounding on both sides: judged against the whole gradient, not their own size
            total = math.sqrt(sum(float(r.pow(2).sum()) for r, _ in pairs.values()))
            for name, (ref, mine) in pairs.items():
                if float((ref - mine).norm()) > 1e-3 * float(ref.norm() + mine.norm()) + 1e-5 * total:
                    raise DpftError(f"parameter {name} gets gradient outside its hooked layer call (e.g. the weight "
                                    "is also read directly); ghost/bk clipping cannot bound that part: "
                                    "use engine.grad_sample_mode=hooks or freeze/untie it")
    finally:
        hooks.cleanup()
        for name, p in params.items():
            p.grad = saved[name]
        probe.train(was_training)
