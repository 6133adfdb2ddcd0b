"""One optimizer step as a plain function: per-sample gradients → clip → noise → post-process →
optimizer. Every method runs through `dp_step`; `nonprivate_step` is the plain baseline.

Privacy-relevant invariants (tested in tests/test_privacy.py):
* each example's contribution to the clipped sum S has L2 norm ≤ method.sensitivity();
* the noise added to S is N(0, std²) per entry with std = method.noise_std()[name], drawn from
  the step's `StepNoise` (dpft/engine/noise.py: keyed per run and step, never from the public
  seed) that nothing else draws from;
* `method.postprocess` receives only the privatised mean (S + Z)/B and public numbers; S itself
  is used afterwards for the alignment diagnostics only and never reaches the update.
S, Z and everything after them live in `method.space_shape(name, p)` (the parameter's own shape
unless a method privatises a data-independent linear projection, as grape does: hooks mode then
gets per-sample gradients already in that shape, ghost mode maps the clipped sum with
`method.space_map`), and `method.apply_update` hands the result to the optimizer (default:
p.grad = G', optimizer.step()).
`add_injected` is the one entry for per-sample gradients that come from no example (the white-box
canaries of `dpft audit --canary gradient`): they get the method's clip and join S before the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpft.errors import DpftError
from dpft.models import model_inputs


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # [b] class ids, or [b, T] next-token targets (-100 = no loss) for causal LMs
    token_type_ids: Tensor | None = None
    loss_reduction: str = "mean"  # causal LMs: per-sequence "mean" or "sum" over target tokens
    autocast: str | None = None  # "bf16": the forward runs under bf16 autocast (engine.autocast)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def per_sample_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Loss of each example (the privacy unit), shape [b]. For a causal LM (2-D labels) one
    example is one sequence: its token losses over the target tokens are reduced to one number
    per sequence, so per-sample gradients and clipping act on whole (table, text) examples."""
    # autocast wraps the forward only: backward follows the forward's dtypes, and clipping, noise
    # and post-processing stay in fp32
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=batch.autocast == "bf16"):
        out = model(**model_inputs(model, batch.input_ids, batch.attention_mask, batch.token_type_ids))
    if batch.labels.dim() == 2:
        nll, count = token_nll(out.logits, batch.labels)
        return nll if batch.loss_reduction == "sum" else nll / count.clamp_min(1)
    return F.cross_entropy(out.logits.float(), batch.labels, reduction="none")


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence summed next-token NLL over positions whose label is not -100, and the number
    of such positions: logits[:, t] predicts labels[:, t + 1]."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    b, t, v = shift_logits.shape
    tok = F.cross_entropy(shift_logits.reshape(b * t, v), shift_labels.reshape(b * t), ignore_index=-100,
                          reduction="none").view(b, t)
    mask = shift_labels != -100
    return (tok * mask).sum(1), mask.sum(1)


def _cos(dot: float, na: float, nb: float) -> float:
    return dot / (na * nb) ** 0.5 if na > 0 and nb > 0 else float("nan")


def _finite_losses(losses: Tensor) -> Tensor:
    return torch.isfinite(losses.detach())


def _zero_out(factors: Tensor, keep: Tensor) -> Tensor:
    """Factor 0 for the examples not kept (non-finite): [b] or [P, b] factors."""
    return torch.where(keep, factors, torch.zeros((), dtype=factors.dtype, device=factors.device))


def _clipped_sum_hooks(model, batch, method, params, clipped, n_chunks=1) -> tuple[Tensor, Tensor, Tensor, int]:
    """Materialised per-sample gradients (Opacus' grad samplers). An example whose loss or per-sample
    gradient is non-finite gets factor 0 and its rows are masked out of the sum (issue 16.5)."""
    losses = per_sample_loss(model, batch)
    losses.sum().backward()
    grad_samples = [p.grad_sample for p in params.values()]
    if any(g is None for g in grad_samples):
        missing = [n for n, p in params.items() if p.grad_sample is None]
        raise DpftError(f"no per-sample gradient for {missing[:3]}: the layer is unused or unsupported")
    sq_norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grad_samples])  # [P, b]
    keep = _finite_losses(losses) & torch.isfinite(sq_norms).all(0)
    sq_norms = torch.where(keep, sq_norms, torch.zeros((), device=sq_norms.device))
    factors = _zero_out(method.clip_factors(sq_norms), keep)
    for k, (name, p) in enumerate(params.items()):
        w = factors if factors.dim() == 1 else factors[k]
        g = p.grad_sample.float()
        g = torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), device=g.device))
        # fp32, like the norms: under bf16 autocast the bound ‖w_i g_i‖ ≤ C must hold for the very
        # numbers whose norms set w_i, not for a bf16 re-rounding of them
        _accumulate(clipped, name, torch.einsum("b,b...->...", w.float(), g))
        p.grad_sample = None
        p.grad = None
    return losses.detach(), sq_norms.sum(0).sqrt(), factors, int((~keep).sum())


def _factors_bounded(method, params, losses, n_chunks) -> tuple[Tensor, Tensor, Tensor]:
    """(factors [b], norms [b], keep [b]) from the hooks' norms inflated by their rounding-error bounds
    (dpft/engine/bookkeeping.py: the released contribution, not just the norm, is ≤ the sensitivity);
    non-finite examples get factor 0."""
    from dpft.engine.bookkeeping import bounded_sq_norms

    sq_norms, keep = bounded_sq_norms(params, n_chunks)
    keep = keep & _finite_losses(losses)
    factors = method.clip_factors(sq_norms)
    if factors.dim() != 1:
        raise DpftError(f"method {method.name} needs per-parameter factors: use engine.grad_sample_mode=hooks")
    return _zero_out(factors, keep), sq_norms.sum(0).sqrt(), keep


def _clipped_sum_ghost(model, batch, method, params, clipped, hooks, n_chunks=1) -> tuple[Tensor, Tensor, Tensor, int]:
    """Ghost clipping (Opacus' two backwards): per-sample norms from the first backward, then a second
    backward of Σ w_i·loss_i. That backward recomputes each example's gradient in fp32 (not exactly w_i
    times the first one), so its clipped sum is formed from its own kept (A, B') and re-measured: each
    example is scaled by α_i = min(1, sensitivity / bounded norm of what it now contributes) — ≈ 1 but
    for rounding — which makes the bound exact for what is released (dpft/engine/bookkeeping.py)."""
    from dpft.engine.bookkeeping import bounded_sq_norms

    losses = per_sample_loss(model, batch)
    try:
        hooks.hold, hooks.keep = True, False
        losses.sum().backward(retain_graph=True)
        factors, norms, keep = _factors_bounded(method, params, losses, n_chunks)
        hooks.samples.clear()  # the first backward's per-sample gradients: norms taken, not summed
        for p in params.values():
            p.grad = None
        hooks.hold, hooks.keep = False, True
        zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
        # masked, not multiplied: a non-finite loss times 0 is NaN (its B' rows are masked in clipped_sum)
        (torch.where(keep, factors.detach().to(losses.dtype), zero) * torch.where(keep, losses, zero)).sum().backward()
        for p in params.values():
            p.grad = None  # autograd's own sum of the second backward: discarded, never released
        sq2, keep2 = bounded_sq_norms(params, n_chunks)
        keep = keep & keep2
        alpha = (method.sensitivity() / sq2.sum(0).sqrt().double().clamp_min(1e-300)).clamp(max=1.0)
        alpha = torch.where(keep, alpha, torch.zeros((), dtype=alpha.dtype, device=alpha.device)).float()
        for name, g in hooks.clipped_sum(alpha, params).items():
            _accumulate(clipped, name, method.space_map(name, g.float()))
    finally:
        hooks.hold, hooks.keep = False, False
        hooks.forget()
    return losses.detach(), norms, factors * alpha, int((~keep).sum())


def _clipped_sum_bk(model, batch, method, params, clipped, hooks, n_chunks=1) -> tuple[Tensor, Tensor, Tensor, int]:
    """Book-keeping: bounded norms and the clipped sum from one backward (dpft/engine/bookkeeping.py)."""
    try:
        hooks.keep = hooks.skip_weight_grads = True
        losses = per_sample_loss(model, batch)
        losses.sum().backward()
        hooks.restore_requires_grad()
        for p in params.values():
            p.grad = None  # autograd's unclipped sum (of the layers it still formed): discarded, never released
        factors, norms, keep = _factors_bounded(method, params, losses, n_chunks)
        for name, g in hooks.clipped_sum(factors.detach(), params).items():
            _accumulate(clipped, name, method.space_map(name, g.float()))
    finally:
        hooks.restore_requires_grad()
        hooks.forget()
    return losses.detach(), norms, factors, int((~keep).sum())


def add_injected(method, rows, clipped: dict[str, Tensor]) -> None:
    """The seam of `dpft audit --canary gradient`: per-sample gradients chosen by an auditor (not
    computed from any example) are clipped by the method's own rule and added to the clipped sum
    S, so the noise, post-processing and release treat them exactly as a real example's. `rows` is
    None (nothing this step) or has ``sq_norms()`` ([P, k] squared norms per privatised tensor, in
    the order of `clipped`) and ``weighted_sum(factors)`` (Σ_i w_i g_i per tensor name, in the
    privatised space, for [k] or [P, k] factors). A method opts in by having an attribute
    ``injected_gradients(step, noise) -> rows``; dpft.audit wraps the method to provide it."""
    if rows is None:
        return
    factors = method.clip_factors(rows.sq_norms())
    for name, g in rows.weighted_sum(factors).items():
        clipped[name].add_(g.to(clipped[name].dtype))


def dp_step(*, model, chunks: list[Batch], method, params: dict[str, nn.Parameter], optimizer,
            noise_generator, mode: str, hooks, step: int,
            alignment: bool = True, per_layer: bool = False, dist=None) -> dict:
    """One DP optimizer step over a Poisson-sampled logical batch split into `chunks`. With
    `dist` (data parallel, dpft/engine/distributed.py) `chunks` is this rank's shard of the
    logical batch: the clipped sums are summed over ranks before the (once-drawn) noise.
    `noise_generator` is the step's `dpft.engine.noise.StepNoise` (training), or a plain
    torch.Generator (unit tests and benchmarks of the step itself: single draws)."""
    clipped: dict[str, Tensor] = {}  # S per parameter, filled by the micro-batches (`_accumulate`)
    losses, norms, factors = [], [], []
    nonfinite = 0  # examples given factor 0 for a non-finite loss/gradient (non-released diagnostic)
    for batch in chunks:  # an empty Poisson draw leaves S = 0 and still takes the noisy step
        if mode == "hooks":
            out = _clipped_sum_hooks(model, batch, method, params, clipped, len(chunks))
        elif mode == "bk":
            out = _clipped_sum_bk(model, batch, method, params, clipped, hooks, len(chunks))
        else:
            out = _clipped_sum_ghost(model, batch, method, params, clipped, hooks, len(chunks))
        losses.append(out[0]); norms.append(out[1])
        factors.append(out[2] if out[2].dim() == 1 else out[2].min(0).values)
        nonfinite += out[3]
    clipped = _in_order(clipped, params, method)
    # auditor-chosen per-sample gradients (`dpft audit --canary gradient`): one rank adds them, so
    # the summed S counts each once
    inject = getattr(method, "injected_gradients", None)
    if inject is not None and (dist is None or dist.is_main):
        add_injected(method, inject(step, noise_generator), clipped)

    if dist is not None:  # S over the whole logical batch, and its per-example statistics
        dist.sum_(clipped)
        nonfinite = int(dist.gather(torch.tensor([nonfinite], device=dist.device)).sum())
        losses, norms, factors = ([dist.gather(torch.cat(x) if x else torch.zeros(0, device=dist.device))]
                                  for x in (losses, norms, factors))
    b = method.privacy.expected_batch_size
    std = method.noise_std()
    noised = {}
    for (name, s), z in zip(clipped.items(), _gaussians(noise_generator, clipped, std)):
        noised[name] = z.add_(s).div_(b)  # (s + z) / b, rounded the same, without two temporaries
    processed = method.postprocess(noised, {n: float(std[n]) / b for n in noised}, step)

    stats = {"batch_size": sum(len(c) for c in chunks) if dist is None else int(losses[0].numel())}
    if losses and sum(x.numel() for x in losses):
        all_losses, all_norms, all_f = torch.cat(losses), torch.cat(norms), torch.cat(factors)
        stats["nonfinite"] = nonfinite
        finite = torch.isfinite(all_losses)
        stats["loss"] = float(all_losses[finite].mean()) if finite.any() else float("nan")
        stats["clipped_frac"] = float((all_f < 1.0 - 1e-6).float().mean())
        stats["grad_norm_median"] = float(all_norms.median())
    if alignment:
        stats.update(_alignment(clipped, noised, processed, b, per_layer))

    method.apply_update(params, processed, optimizer, step)
    return stats


def _in_order(clipped: dict[str, Tensor], params: dict[str, nn.Parameter], method) -> dict[str, Tensor]:
    """S in the parameters' order — the noise is drawn in this order, so it must not depend on the
    order the micro-batches filled S in — with S = 0 for a parameter no micro-batch reached (an
    empty Poisson draw: still noised)."""
    out = {}
    for n, p in params.items():
        # the privatised space of each parameter: its own shape, or the method's (e.g. grape's projection)
        shape = tuple(method.space_shape(n, p))
        s = clipped.get(n)
        if s is None:
            s = torch.zeros(shape, dtype=torch.float32, device=p.device)
        elif tuple(s.shape) != shape:
            raise DpftError(f"clipped sum of {n} has shape {tuple(s.shape)}, its privatised space {shape}")
        out[n] = s
    return out


def _accumulate(clipped: dict[str, Tensor], name: str, g: Tensor) -> None:
    """S[name] += g; the first micro-batch's fp32 g (a fresh tensor the caller gives up) becomes
    S[name] itself: 0 + g = g, so this saves a parameter-sized fill and add per step."""
    if name in clipped:
        clipped[name].add_(g)
    elif g.dtype == torch.float32 and g.is_contiguous():
        clipped[name] = g
    else:
        clipped[name] = g.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _gaussians(noise, clipped: dict[str, Tensor], std: dict) -> list[Tensor]:
    """The step's noise, one tensor per entry of `clipped` in its (the parameters') order."""
    specs = [(s.shape, float(std[name])) for name, s in clipped.items()]
    if isinstance(noise, torch.Generator):
        return [torch.normal(0.0, sd, size=shape, generator=noise, device=s.device)
                for (shape, sd), s in zip(specs, clipped.values())]
    devices = {s.device for s in clipped.values()}
    if len(devices) <= 1:
        return noise.gaussians(specs, devices.pop() if devices else "cpu")
    return [noise.gaussians([spec], s.device)[0] for spec, s in zip(specs, clipped.values())]  # a model split over devices


def _alignment(clipped, noised, processed, b, per_layer) -> dict:
    """cos(noised, clipped) and cos(processed, clipped) over the whole trainable vector; the
    clipped gradient X = S/B is a non-private diagnostic."""
    dn = dp = nx = nn_ = np_ = 0.0
    layers = {}
    for name, s in clipped.items():
        x = s / b
        g, h = noised[name], processed[name]
        xg, xh = float((x * g).sum()), float((x * h).sum())
        xx, gg = float((x * x).sum()), float((g * g).sum())
        hh = gg if h is g else float((h * h).sum())
        dn += xg; dp += xh; nx += xx; nn_ += gg; np_ += hh
        if per_layer and h is not g:
            c_n, c_p = _cos(xg, xx, gg), _cos(xh, xx, hh)
            layers[f"layer/{name}/cos_noised"] = c_n
            layers[f"layer/{name}/improvement"] = c_p - c_n
    cos_n, cos_p = _cos(dn, nx, nn_), _cos(dp, nx, np_)
    out = {"cos_noised": cos_n, "cos_final": cos_p, "improvement": cos_p - cos_n}
    out.update(layers)
    return out


def nonprivate_step(*, model, chunks: list[Batch], params, optimizer) -> dict:
    total = sum(len(c) for c in chunks)
    loss_sum = 0.0
    for batch in chunks:
        losses = per_sample_loss(model, batch)
        (losses.sum() / total).backward()
        loss_sum += float(losses.detach().sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"batch_size": total, "loss": loss_sum / max(total, 1)}
