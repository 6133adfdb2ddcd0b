"""Batched denoising of same-shape gradient matrices: ``denoise_batch``, ``denoise_matrix`` and the
routine both share (``denoise_rows``): threshold, decompose, shrink, rebuild, norm-correct, with every
numerical failure turned into "use the noised gradient unchanged" and a ``DenoiseWarning``."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from dpft.methods.denoise.linalg import (block_krylov, finite_rows, per_matrix, right_spectrum, stack, svd,
                                        threshold_test)
from dpft.methods.denoise.rmt import SHRINKERS, shrink_rows


EMPTY_POLICIES = ("keep", "zero")


# Below this small side the exact Gram + eigh decomposition is as cheap as the iterative test.
SMALL_SIDE = 64


class DenoiseWarning(RuntimeWarning):
    """A gradient matrix could not be decomposed; its noised gradient was used unchanged."""


@dataclass
class DenoiseInfo:
    """Per-matrix outcome of one batched call (all tensors of length b, on the CPU)."""

    rank: Tensor        # kept singular triplets (0 = no signal above κe)
    changed: Tensor     # the returned matrix differs from the input (denoised or zeroed)
    failed: Tensor      # no decomposition succeeded: the input is returned unchanged
    exact: Tensor       # an exact decomposition was computed (reference, small side, or fallback)
    top_ratio: Tensor   # λ₁ / bulk edge (exact where computed, a Lanczos lower bound where skipped)
    bad_input: Tensor   # the input matrix was not finite (a subset of ``failed``)
    retries: int = 0    # decompositions that needed a retry (fp64 / other driver / CPU)


def check_args(kappa: float, empty_policy: str, test_iters: int, margin: float, shrinker: str = "optimal") -> None:
    if shrinker not in SHRINKERS:
        raise ValueError(f"shrinker must be one of {SHRINKERS}, got {shrinker!r}")
    if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa >= 1.0):
        raise ValueError(f"kappa must be a finite number ≥ 1 (below 1 pure noise passes the threshold), got {kappa!r}")
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")
    if int(test_iters) < 2:
        raise ValueError(f"test_iters must be ≥ 2, got {test_iters!r}")
    if not 0.0 <= float(margin) < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")


def _drop_nonfinite(mats, rows: Tensor, info: "DenoiseInfo") -> Tensor:
    """``rows`` (bool mask) without the matrices that contain inf/NaN, which are marked failed with a
    warning: no decomposition of them means anything."""
    idx = rows.nonzero().flatten().tolist()
    bad = [i for i in idx if not bool(torch.isfinite(mats[i]).all())]
    if bad:
        info.failed[bad] = True
        info.bad_input[bad] = True
        warnings.warn(f"denoise: {len(bad)} gradient matrix(es) are not finite; returned unchanged",
                      DenoiseWarning, stacklevel=4)
        rows = rows.clone()
        rows[bad] = False
    return rows


def _fast_path(mats, idx: Tensor, *, edge: Tensor, thr: Tensor, test_iters: int, margin: float,
               gen: torch.Generator, info: DenoiseInfo, kept: dict, batched: bool | None = None) -> Tensor:
    """The fast exact path up to the exact decomposition: the Lanczos threshold test skips the rows
    of ``idx`` clearly below the threshold, and the block Krylov iteration settles most of the rest
    (their kept triplets go into ``kept``). Returns the rows that still need the exact decomposition:
    a small side, a failed test, or no convergence."""
    M = mats[0].shape[1]
    dev = mats[0].device
    small = M <= max(SMALL_SIDE, 2 * test_iters)
    exact_rows, iter_rows = (idx, idx[:0]) if small else (idx[:0], idx)
    if len(iter_rows):
        try:
            ritz64, vecs, ok = threshold_test(mats, iter_rows.tolist(), test_iters, gen, batched)
        except RuntimeError:
            q = min(test_iters, M)
            ritz64, vecs = torch.zeros(len(iter_rows), q, dtype=torch.float64), None
            ok = torch.zeros(len(iter_rows), dtype=torch.bool)
        info.top_ratio[iter_rows] = torch.where(ok, ritz64[:, 0] / edge[iter_rows], info.top_ratio[iter_rows])
        skip = ok & (ritz64[:, 0] < (1 - margin) * thr[iter_rows])
        go = ~skip & ok
        # a failed Lanczos run says nothing about the spectrum: decide exactly
        exact_rows = torch.cat([exact_rows, iter_rows[~ok]])
        if bool(go.any()):
            sub = iter_rows[go]
            k_hint = (ritz64[go] >= (1 - margin) * thr[sub][:, None]).sum(1)
            sub_vecs = vecs[go.to(vecs.device)]
            # CPU: one matrix at a time (a cache-resident GEMM beats CPU batched matmul, and each
            # matrix stops at its own convergence); GPU: the whole batch at once
            parts = [[j] for j in range(len(sub))] if per_matrix(dev, batched) else [list(range(len(sub)))]
            res, need = [None] * len(sub), torch.ones(len(sub), dtype=torch.bool)
            for part in parts:
                try:
                    r_p, n_p = block_krylov(stack(mats, sub[part].tolist()), thr[sub[part]],
                                            sub_vecs[part], k_hint[part], margin, gen)
                except RuntimeError:
                    continue
                for j, r_j, n_j in zip(part, r_p, n_p.tolist()):
                    res[j], need[j] = r_j, n_j
            for j, i in enumerate(sub.tolist()):
                if res[j] is not None and not bool(need[j]) and len(res[j][0]):
                    info.top_ratio[i] = float(res[j][0][0]) / float(edge[i])
                    kept[i] = res[j]
            exact_rows = torch.cat([exact_rows, sub[need]])
    return exact_rows


def denoise_rows(mats, noise_std, *, kappa: float, norm_correction: bool, empty_policy: str,
                 fast: bool, test_iters: int, margin: float, gen: torch.Generator | None,
                 shrinker: str = "optimal", batched: bool | None = None):
    """Core of the batched denoiser. ``mats``: same-shape float32 matrices N × M with N ≥ M (callers
    orient), a list of views or a (b, N, M) tensor. Returns (rows, D, info): indices of the matrices
    that change, their new values (len(rows), N, M) and a ``DenoiseInfo``."""
    b = len(mats)
    N, M = mats[0].shape
    dev = mats[0].device
    if gen is None:
        gen = torch.Generator(device=dev).manual_seed(0)
    s = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).cpu()
    if s.numel() == 1 and b != 1:
        s = s.expand(b).clone()
    if s.numel() != b:
        raise ValueError(f"noise_std has {s.numel()} entries for {b} matrices")
    edge = s * (math.sqrt(N) + math.sqrt(M))
    thr = kappa * edge
    info = DenoiseInfo(rank=torch.zeros(b, dtype=torch.long), changed=torch.zeros(b, dtype=torch.bool),
                       failed=torch.zeros(b, dtype=torch.bool), exact=torch.zeros(b, dtype=torch.bool),
                       top_ratio=torch.full((b,), float("nan"), dtype=torch.float64),
                       bad_input=torch.zeros(b, dtype=torch.bool))
    # s = 0 means no noise (nothing to remove); a non-finite input cannot be decomposed.
    active = (s > 0) & torch.isfinite(s)
    if not fast:
        active = _drop_nonfinite(mats, active, info)
    kept: dict[int, tuple[Tensor, Tensor]] = {}      # row -> (σ_kept, V_kept): rebuild as Y V diag(η/σ) Vᵀ
    kept_svd: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # row -> (U, σ, Vh) from the reference SVD

    idx = active.nonzero().flatten()
    if len(idx) and not fast:
        U, S, Vh, failed, info.retries = svd(stack(mats, idx.tolist()))
        for j, i, k in _above_threshold(idx, S, failed, edge, thr, info):
            kept_svd[i] = (U[j, :, :k], S[j, :k], Vh[j, :k])
    elif len(idx):
        exact_rows = _fast_path(mats, idx, edge=edge, thr=thr, test_iters=test_iters, margin=margin, gen=gen,
                                info=info, kept=kept, batched=batched)
        if len(exact_rows):
            # a non-finite input is the one case the Lanczos test cannot tell apart: check it here
            keep = _drop_nonfinite(mats, torch.zeros(b, dtype=torch.bool).index_fill_(0, exact_rows, True), info)
            exact_rows = keep.nonzero().flatten()
        if len(exact_rows):
            sig, V, failed, retries = right_spectrum(stack(mats, exact_rows.tolist()), thr[exact_rows])
            info.retries += retries
            for j, i, k in _above_threshold(exact_rows, sig, failed, edge, thr, info):
                kept[i] = (sig[j, :k], V[j, :, :k])
    if bool((info.failed & ~info.bad_input).any()):
        warnings.warn(f"denoise: decomposition failed for {int((info.failed & ~info.bad_input).sum())} gradient "
                      f"matrix(es) after retries (fp64, other drivers, CPU); their noised gradients are used "
                      f"unchanged", DenoiseWarning, stacklevel=3)

    rows = sorted(set(kept) | set(kept_svd))
    D_rows: list[Tensor] = []
    if rows:
        Yr = stack(mats, rows)
        D = _rebuild(Yr, rows, kept, kept_svd, s, N, M, shrinker)
        if norm_correction:
            nY = torch.linalg.vector_norm(Yr.flatten(1), dim=1)
            nD = torch.linalg.vector_norm(D.flatten(1), dim=1)
            D = D * (nY / nD.clamp_min(torch.finfo(D.dtype).tiny))[:, None, None]
        good = finite_rows(D).cpu()
        for j, i in enumerate(rows):
            if bool(good[j]):
                info.rank[i] = int(kept[i][0].numel() if i in kept else kept_svd[i][1].numel())
                info.changed[i] = True
            else:
                info.failed[i] = True
        if not bool(good.all()):
            warnings.warn("denoise: a rebuilt gradient was not finite; the noised gradient is used unchanged",
                          DenoiseWarning, stacklevel=3)
        D_rows = [D[j] for j in range(len(rows)) if bool(good[j])]
        rows = [i for j, i in enumerate(rows) if bool(good[j])]
    if empty_policy == "zero":
        empty = active & ~info.failed & (info.rank == 0)
        for i in empty.nonzero().flatten().tolist():
            rows.append(i)
            D_rows.append(torch.zeros_like(mats[i]))
            info.changed[i] = True
    order = sorted(range(len(rows)), key=lambda j: rows[j])
    rows_t = torch.as_tensor([rows[j] for j in order], dtype=torch.long)
    D_out = torch.stack([D_rows[j] for j in order]) if rows else mats[0].new_zeros(0, N, M)
    return rows_t, D_out, info


def _above_threshold(rows: Tensor, sig: Tensor, failed: Tensor, edge: Tensor, thr: Tensor,
                     info: DenoiseInfo) -> list[tuple[int, int, int]]:
    """After an exact decomposition of ``mats[rows]`` (singular values ``sig``, descending, and a
    ``failed`` mask): record each row as exact (or failed) with its λ₁/edge, and return (j, row, k)
    for every decomposed row with k ≥ 1 singular values above the threshold (the triplets to keep)."""
    info.exact[rows] = True
    info.failed[rows[failed.cpu()]] = True
    sig64 = sig.double().cpu()
    out = []
    for j, i in enumerate(rows.tolist()):
        if bool(failed[j]):
            continue
        info.top_ratio[i] = sig64[j, 0] / edge[i]
        k = int((sig64[j] > thr[i]).sum())
        if k:
            out.append((j, i, k))
    return out


def _rebuild(Yr, rows, kept, kept_svd, s, N, M, shrinker: str = "optimal") -> Tensor:
    """D = Σ_kept η_i u_i v_iᵀ for each row, padded to a common rank so it runs as one batch. Rows
    from the eigendecomposition have no U: u_i = Y v_i/σ_i, so D = (Y V) diag(η/σ) Vᵀ."""
    dev = Yr.device
    k_max = max((kept[i][0].numel() if i in kept else kept_svd[i][1].numel()) for i in rows)
    b = len(rows)
    sig = torch.zeros(b, k_max, dtype=torch.float64, device=dev)
    V = Yr.new_zeros(b, M, k_max)
    L = Yr.new_zeros(b, N, k_max)
    from_svd = torch.zeros(b, dtype=torch.bool)
    for j, i in enumerate(rows):
        if i in kept:
            sg, v = kept[i]
            V[j, :, : sg.numel()] = v
        else:
            u, sg, vh = kept_svd[i]
            V[j, :, : sg.numel()] = vh.mT
            L[j, :, : sg.numel()] = u
            from_svd[j] = True
        sig[j, : sg.numel()] = sg.double()
    eta = shrink_rows(sig, s[rows].to(dev), N, M, shrinker)  # 0 on the padding (σ = 0 is below any edge)
    fs = from_svd.to(dev)[:, None]
    coef = torch.where(fs, eta, torch.where(sig > 0, eta / sig.clamp_min(1e-300), torch.zeros_like(eta)))
    if not bool(from_svd.all()):
        L = torch.where(fs[:, :, None], L, Yr @ V)
    return (L * coef.to(Yr.dtype)[:, None, :]) @ V.mT


def denoise_batch(grads: Tensor, noise_std, kappa: float = 1.02, norm_correction: bool = True, *,
                  empty_policy: str = "keep", fast: bool = True, test_iters: int = 20, margin: float = 0.01,
                  generator: torch.Generator | None = None, shrinker: str = "optimal",
                  batched: bool | None = None) -> tuple[Tensor, DenoiseInfo]:
    """Denoise a batch of same-shape gradient matrices ``grads`` (b, n, m) whose entries carry
    i.i.d. Gaussian noise of known per-matrix std ``noise_std`` (a float or b floats).

    Returns a new tensor of the input's dtype (unchanged matrices copied) and a ``DenoiseInfo``.
    ``fast=False`` is the full-SVD reference; ``fast=True`` the Lanczos test + truncated path
    (module docstring); `batched` picks the iterative stages' form (default: matrix by matrix on a
    CPU, the whole batch at once on a GPU; same answers). Post-processing only: nothing but the
    noised matrices and public numbers (s, κ, shapes) is used."""
    check_args(kappa, empty_policy, test_iters, margin, shrinker)
    if grads.dim() != 3:
        raise ValueError(f"grads must be (batch, n, m), got shape {tuple(grads.shape)}")
    flip = grads.shape[1] < grads.shape[2]
    Y = grads.float()
    Y = Y.mT if flip else Y
    rows, D, info = denoise_rows(Y, noise_std, kappa=kappa, norm_correction=norm_correction,
                                 empty_policy=empty_policy, fast=fast, test_iters=test_iters, margin=margin,
                                 gen=generator, shrinker=shrinker, batched=batched)
    out = grads.clone()
    if len(rows):
        out[rows.to(grads.device)] = (D.mT if flip else D).to(grads.dtype)
    return out, info


def denoise_matrix(grad: Tensor, noise_std: float, kappa: float = 1.02, norm_correction: bool = True, *,
                   empty_policy: str = "keep", fast: bool = False, test_iters: int = 20, margin: float = 0.01,
                   generator: torch.Generator | None = None, shrinker: str = "optimal") -> Tensor:
    """Denoise one noised gradient matrix ``grad`` (n × m) whose noise has per-entry std
    ``noise_std`` exactly (s = σC/B for the engine's mean gradient; never an estimate from data).

    Computes in fp32 (bf16/fp16 inputs upcast) and returns the same shape and dtype. If no singular
    value exceeds κ·s(√n+√m), or the decomposition fails (with a ``DenoiseWarning``), the input
    object itself is returned (``empty_policy="zero"`` returns zeros instead for the former).
    ``fast=False`` (default) is the full-SVD reference; ``fast=True`` the fast exact path."""
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix, got shape {tuple(grad.shape)}")
    check_args(kappa, empty_policy, test_iters, margin, shrinker)
    flip = grad.shape[0] < grad.shape[1]
    Y = grad.float()
    Y = (Y.mT if flip else Y)[None]
    rows, D, _ = denoise_rows(Y, [float(noise_std)], kappa=kappa, norm_correction=norm_correction,
                              empty_policy=empty_policy, fast=fast, test_iters=test_iters, margin=margin,
                              gen=generator, shrinker=shrinker)
    if not len(rows):
        return grad
    d = D[0].mT if flip else D[0]
    return d.contiguous().to(grad.dtype)
