"""The linear algebra of the denoiser: decompositions with retries (SVD, small-side Gram + eigh),
the Lanczos threshold test and the warm-started block Krylov iteration (module docstring of
``dpft.methods.denoise``: "Fast exact path", "Batching", "Numerics")."""

from __future__ import annotations

import torch
from torch import Tensor


# Residual (‖Yᵀu − σv‖) below which a Ritz triplet counts as converged, relative to κe. Vector errors
# are residual/gap; 1e-5 keeps the rebuilt matrix within 1e-3 of the full-SVD reference, a
# decade above fp32 rounding of the matrix products.
RESIDUAL_TOL = 1e-5


# Block-Krylov steps before a layer falls back to the exact decomposition.
MAX_SWEEPS = 12


# Smallest block of the block-Krylov stage: room for a few kept triplets plus oversampling.
MIN_BLOCK = 8


# Above λ₁/threshold = 30 the fp32 Gram moves values at the threshold by > 1e-4 relative (ε·30²):
# those matrices take the SVD.
GRAM_RATIO = 30.0


def per_matrix(device: torch.device, batched: bool | None = None) -> bool:
    """Run the iterative stages matrix by matrix (see "Batching" above): by default on a CPU; the
    batched form is the GPU path, and `batched=True` runs it anywhere (the tests do, on a CPU)."""
    return device.type == "cpu" if batched is None else not batched


def stack(mats, idx) -> Tensor:
    return torch.stack([mats[i] for i in idx])


def finite_rows(*ts: Tensor) -> Tensor:
    ok = None
    for t in ts:
        r = torch.isfinite(t).flatten(1).all(1)
        ok = r if ok is None else ok & r
    return ok


def _svd_attempts(y: Tensor):
    """Ways to get a thin SVD of one matrix, cheapest first (the pitfalls list: cuSOLVER drivers give
    up on some inputs; fp64 and the CPU LAPACK path are the robust fallbacks)."""
    if y.is_cuda:
        for driver in ("gesvdj", "gesvd"):
            yield lambda d=driver: torch.linalg.svd(y, full_matrices=False, driver=d)
        yield lambda: torch.linalg.svd(y.double(), full_matrices=False)
    yield lambda: torch.linalg.svd(y.double().cpu(), full_matrices=False)


def svd(Y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Thin SVD of a batch Y (b, N, M) in fp32. Returns U, S, Vh, failed (b,) bool, retries."""
    try:
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        bad = ~finite_rows(U, S, Vh)
    except RuntimeError:  # LinAlgError is a RuntimeError; one bad matrix fails the whole batch call
        U = Y.new_zeros(Y.shape[0], Y.shape[1], min(Y.shape[1:]))
        S = Y.new_zeros(Y.shape[0], min(Y.shape[1:]))
        Vh = Y.new_zeros(Y.shape[0], min(Y.shape[1:]), Y.shape[2])
        bad = torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    failed = torch.zeros_like(bad)
    retries = 0
    for i in bad.nonzero().flatten().tolist():
        retries += 1
        for attempt in _svd_attempts(Y[i]):
            try:
                u, s, vh = attempt()
            except RuntimeError:
                continue
            if bool(torch.isfinite(u).all() & torch.isfinite(s).all() & torch.isfinite(vh).all()):
                U[i], S[i], Vh[i] = u.to(U), s.to(S), vh.to(Vh)
                break
        else:
            failed[i] = True
    return U, S, Vh, failed, retries


def right_spectrum(Y: Tensor, thr: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Exact singular values (descending) and right singular vectors of Y (b, N, M), N ≥ M, from the
    eigendecomposition of the M × M Gram matrix: several times cheaper than an SVD. The Gram
    squares the spread: fp32 rounding moves a singular value near the threshold by ~ε·λ₁²/thr, so
    matrices with λ₁ > GRAM_RATIO·thr (thr (b,) on the CPU) are redone by SVD, whose error is ε·λ₁.
    Retries as in ``svd``."""
    sig = Y.new_zeros(Y.shape[0], Y.shape[2])
    V = Y.new_zeros(Y.shape[0], Y.shape[2], Y.shape[2])
    try:
        evals, evecs = torch.linalg.eigh(Y.mT @ Y)
        bad = ~finite_rows(evals, evecs)
        sig = evals.flip(-1).clamp_min(0).sqrt()
        V = evecs.flip(-1)
        wide = (sig[:, 0].double().cpu() > GRAM_RATIO * thr) & ~bad.cpu()
        if bool(wide.any()):
            w = wide.nonzero().flatten()
            _, s_w, vh_w, f_w, _ = svd(Y[w.to(Y.device)])
            sig[w.to(Y.device)], V[w.to(Y.device)] = s_w, vh_w.mT
            bad[w[f_w.cpu()].to(Y.device)] = True
    except RuntimeError:
        bad = torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    failed = torch.zeros_like(bad)
    retries = 0
    for i in bad.nonzero().flatten().tolist():
        retries += 1
        y = Y[i]
        attempts = [lambda: torch.linalg.eigh(y.double().mT @ y.double())]
        if y.is_cuda:
            attempts.append(lambda: torch.linalg.eigh(y.double().cpu().mT @ y.double().cpu()))
        for attempt in attempts:
            try:
                ev, vec = attempt()
            except RuntimeError:
                continue
            if bool(torch.isfinite(ev).all() & torch.isfinite(vec).all()):
                sig[i] = ev.flip(-1).clamp_min(0).sqrt().to(sig)
                V[i] = vec.flip(-1).to(V)
                break
        else:  # the SVD chain is the last resort
            _, s, vh, f, _ = svd(y[None])
            if bool(f[0]):
                failed[i] = True
            else:
                sig[i], V[i] = s[0], vh[0].mT
    return sig, V, failed, retries


def _randn(shape, gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


def _lanczos(Y: Tensor, iters: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lanczos on A = YᵀY (Y: b × N × M, N ≥ M) with full reorthogonalisation. Returns Ritz singular
    values √θ (b, q) descending, each a lower bound on the matching singular value of Y, and the
    Ritz vectors (b, M, q). No host synchronisation inside the loop (GPU friendly)."""
    b, _, M = Y.shape
    q = min(iters, M)
    Q = Y.new_zeros(b, M, q)
    alpha = Y.new_zeros(b, q)
    beta = Y.new_zeros(b, q)
    v = _randn((b, M, 1), gen, Y)
    v = v / v.norm(dim=1, keepdim=True)
    for j in range(q):
        Q[:, :, j:j + 1] = v
        w = Y.mT @ (Y @ v)
        alpha[:, j] = (v * w).sum(dim=(1, 2))
        if j + 1 == q:
            break
        Qj = Q[:, :, :j + 1]
        for _ in range(2):  # twice is enough (Kahan–Parlett): keeps T = QᵀAQ tridiagonal in fp32
            w = w - Qj @ (Qj.mT @ w)
        norm = w.norm(dim=1, keepdim=True)
        # Breakdown (invariant Krylov space, e.g. a rank-deficient Y): carry on from a fresh random
        # direction orthogonal to Q, with a zero coupling so T stays exact.
        fresh = _randn((b, M, 1), gen, Y)
        for _ in range(2):
            fresh = fresh - Qj @ (Qj.mT @ fresh)
        fresh = fresh / fresh.norm(dim=1, keepdim=True)
        dead = norm <= 1e-6 * alpha[:, :1, None].abs().clamp_min(torch.finfo(Y.dtype).tiny)
        beta[:, j] = torch.where(dead[:, 0, 0], torch.zeros_like(norm[:, 0, 0]), norm[:, 0, 0])
        v = torch.where(dead, fresh, w / norm.clamp_min(torch.finfo(Y.dtype).tiny))
    off = beta[:, : q - 1]
    T = torch.diag_embed(alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta.flip(-1).clamp_min(0).sqrt(), Q @ S.flip(-1)


def _lanczos_2d(Y: Tensor, iters: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """CPU form of ``_lanczos`` for one matrix: the matrix stays in cache across the steps and each
    step is a few in-place operations on preallocated buffers (batched CPU matrix-vector products
    run far below memory bandwidth, and per-operation overhead dominates 384-wide layers).

    Plain three-term recurrence, no reorthogonalisation: in floating point the Ritz values still lie
    within O(ε‖A‖) of [λ_min, λ_max] (Paige), and lost orthogonality only adds copies of values that
    have already converged, so the top Ritz value remains a lower bound on λ₁² and converges as
    fast. Returns Ritz singular values (q,) fp64, descending, and Ritz vectors (M, q), accurate
    enough to warm-start the subspace iteration (which re-orthonormalises them)."""
    N, M = Y.shape
    q = min(iters, M)
    Q = Y.new_empty(q, M)
    alpha, beta = [0.0] * q, [0.0] * q
    u, w = Y.new_empty(N), Y.new_empty(M)
    Yt = Y.T
    Q[0] = torch.randn(M, generator=gen, dtype=Y.dtype)
    Q[0] /= Q[0].norm()
    floor = 0.0
    for j in range(q):
        v = Q[j]
        torch.mv(Y, v, out=u)
        if j:
            torch.addmv(Q[j - 1], Yt, u, beta=-beta[j - 1], out=w)
        else:
            torch.mv(Yt, u, out=w)
        a = torch.dot(v, w).item()
        alpha[j] = a
        if j + 1 == q:
            break
        w.sub_(v, alpha=a)
        b = torch.linalg.vector_norm(w).item()
        if j == 0:
            floor = 1e-6 * abs(a)
        if not b > floor:
            raise _Breakdown
        beta[j] = b
        torch.div(w, b, out=Q[j + 1])
    al = torch.tensor(alpha, dtype=torch.float64)
    be = torch.tensor(beta[: q - 1], dtype=torch.float64)
    T = torch.diag(al) + torch.diag(be, 1) + torch.diag(be, -1)
    theta, S = torch.linalg.eigh(T)
    return theta.flip(-1).clamp_min(0).sqrt(), Q.T @ S.flip(-1).to(Y.dtype)


class _Breakdown(RuntimeError):
    """The Krylov space became invariant (e.g. a rank-deficient matrix): use the batched form,
    which restarts from fresh random directions."""


def threshold_test(mats, rows: list[int], iters: int, gen: torch.Generator, batched: bool | None = None):
    """Lanczos lower bounds on the singular values of ``mats[rows]``: Ritz values (b, q) fp64 on the
    CPU (descending), Ritz vectors (b, M, q) on the device, and a (b,) mask of finite runs."""
    dev = mats[0].device
    if per_matrix(dev, batched):
        ritz, vecs, ok = [], [], []
        threads = torch.get_num_threads()
        # matrix-vector products of cache-sized matrices lose to thread start-up: one thread is
        # ~1.5× faster than two here (measured, docs/benchmarks.md)
        torch.set_num_threads(1)
        try:
            for i in rows:
                try:
                    r, v = _lanczos_2d(mats[i], iters, gen)
                except RuntimeError:  # breakdown or a LAPACK failure on T: the batched form copes
                    r, v = _lanczos(mats[i][None], iters, gen)
                    r, v = r[0].double(), v[0]
                ritz.append(r)
                vecs.append(v)
                ok.append(bool(torch.isfinite(r).all() & torch.isfinite(v).all()))
        finally:
            torch.set_num_threads(threads)
        return torch.stack(ritz), torch.stack(vecs), torch.tensor(ok, dtype=torch.bool)
    ritz, vecs = _lanczos(stack(mats, rows), iters, gen)
    return ritz.double().cpu(), vecs, finite_rows(ritz, vecs).cpu()


def block_krylov(Y: Tensor, thr: Tensor, start: Tensor, k_hint: Tensor, margin: float,
                 gen: torch.Generator) -> tuple[list, Tensor]:
    """Singular triplets above ``thr`` of each matrix of Y (b, N, M), N ≥ M, by block Lanczos on
    A = YᵀY (full reorthogonalisation, Rayleigh–Ritz on the whole Krylov space), warm-started from
    the threshold test's Ritz vectors ``start`` (b, M, q).

    The block (rank) doubles while the block's last Ritz value is not clearly below the threshold,
    so a cluster of signal values is never wider than the block (a single-vector Krylov method can
    miss copies of a near-multiple value). A matrix is accepted once each kept triplet has residual
    ‖Av − σ²v‖/σ ≤ RESIDUAL_TOL·κe and the first dropped Ritz value is clearly below κe or has
    converged. Ritz values only grow with the space (interlacing), so a kept value is certainly
    above the threshold. Returns per row (σ_kept, V_kept) or None, and a (b,) bool mask of rows
    that need the exact decomposition (not converged within MAX_SWEEPS block steps)."""
    b, _, M = Y.shape
    out: list = [None] * b
    need_exact = torch.zeros(b, dtype=torch.bool)
    thr_d = thr.to(Y.device, Y.dtype)
    p = max(MIN_BLOCK, 2 * int(k_hint.max()) + 4)
    rows = torch.arange(b)
    while len(rows):
        if 2 * p > M:  # a block this wide costs as much as the exact decomposition
            need_exact[rows] = True
            break
        dv = rows.to(Y.device)
        Yr, th = Y[dv], thr_d[dv]
        cl = (1 - margin) * th
        k0 = min(p, start.shape[2])
        X = torch.linalg.qr(torch.cat([start[dv][:, :, :k0], _randn((len(rows), M, p - k0), gen, Y)], 2)).Q
        basis, products = [X], []
        settled = torch.zeros(len(rows), dtype=torch.bool)
        grow = torch.zeros(len(rows), dtype=torch.bool)
        V = None
        for step in range(MAX_SWEEPS):
            W = Yr.mT @ (Yr @ basis[-1])
            products.append(W)
            K, AK = torch.cat(basis, 2), torch.cat(products, 2)
            H = K.mT @ AK
            mu, S = torch.linalg.eigh((H + H.mT) / 2)
            mu, S = mu.flip(-1), S.flip(-1)
            sig = mu.clamp_min(0).sqrt()
            V = K @ S
            res = (AK @ S - V * mu[:, None, :]).norm(dim=1) / sig.clamp_min(torch.finfo(Y.dtype).tiny)
            kept = sig > th[:, None]
            k = kept.sum(1)
            # fp32 products leave a residual floor ∝ ε·σ₁: measure against the larger of κe and σ₁
            conv = res <= RESIDUAL_TOL * torch.maximum(th, sig[:, 0])[:, None]
            width = sig.shape[1]
            kk = k.clamp_max(width - 1)[:, None]
            nxt, nxt_conv = torch.gather(sig, 1, kk)[:, 0], torch.gather(conv, 1, kk)[:, 0]
            ok = (conv | ~kept).all(1) & ((k >= width) | (nxt < cl) | nxt_conv)
            wide = (sig[:, p - 1] >= cl).cpu()  # the block's own last Ritz value
            done = ok.cpu() & ~wide & ~settled & ~grow
            for j in done.nonzero().flatten().tolist():
                kj = int(k[j])
                out[int(rows[j])] = (sig[j, :kj], V[j, :, :kj])
            settled |= done
            grow |= wide & ~settled
            if bool((settled | grow).all()) or (step + 2) * p > M // 2:
                break
            # Once the wanted directions have converged, W is nearly inside span(K) and what remains
            # after projection is rounding noise; normalising it magnifies its K component, so
            # project again after the QR (Gram–Schmidt twice, the second pass on normalised columns)
            Xn = W
            for _ in range(2):
                Xn = torch.linalg.qr(Xn - K @ (K.mT @ Xn)).Q
            basis.append(Xn)
        need_exact[rows[~(settled | grow)]] = True
        keep = grow.nonzero().flatten()
        start = torch.zeros(b, M, 0, device=Y.device, dtype=Y.dtype)
        if len(keep):
            start = torch.zeros(b, M, p, device=Y.device, dtype=Y.dtype)
            start[rows[keep].to(Y.device)] = V[keep.to(Y.device)][:, :, :p]
        rows = rows[keep]
        p *= 2
    return out, need_exact
