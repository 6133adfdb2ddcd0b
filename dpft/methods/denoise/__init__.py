"""`denoise`: random-matrix-theory (RMT) denoising of DP-SGD's linear-layer gradients.

Paper: Dadsetan & Rudzicz, "Sample-Efficient Differentially Private Fine-Tuning via Gradient Matrix
Denoising", arXiv 2510.01137. Only the abstracts and three public reviews could be read, so **every
formula below is [R], reconstructed** from the spiked-model results the paper builds on
(Benaych-Georges & Nadakuditi 2012; Gavish & Donoho 2017), following
``shared/papers/algorithms-detail.md`` §2. What the paper leaves unknown [U] is exposed as an option
instead of guessed (``shrinker``, ``empty_policy``, ``include_head``). Tags: [P] paper text (abstract),
[R] ours, [U] unknown, [N] second-hand (the project's notes or a review; unverified).
The default κ = 1.02 is [N] (the notes; a review says "empirically tuned" on one dataset, [N]); the
paper's κ range is [U] (the notes say about 1.01–1.05, [N]).

Privacy
-------
Pure post-processing. ``postprocess`` sees only the privatised mean gradient G = (S + Z)/B and public
numbers: the per-entry noise std s = σC/B of each tensor (fixed by the engine before training, never
re-estimated from data), κ and the matrix shapes. It never sees the clipped sum, per-sample
gradients or examples. Sensitivity (C), σ, the sampling rate and the accounting are exactly
DP-SGD's; this method spends exactly the calibrated σ (``noise_multiplier`` is inherited). Its
diagnostics (kept ranks, λ₁/edge, timings) are functions of G only, hence also post-processing.
The random start vectors of the fast path come from the method's own generator: they depend on
nothing private and never touch the engine's noise generator or the global RNG.

Algorithm, per step and per linear weight gradient Y (n × m, Y = X + W, W ~ N(0, s²) i.i.d.)
-------------------------------------------------------------------------------------------
1. Thin SVD Y = Σ λ_i u_i v_iᵀ.
2. (A) Threshold at κ times the Marchenko–Pastur bulk edge e = s(√n + √m). If λ₁ ≤ κe the layer is
   left as it is (``empty_policy=keep``) or set to zero (``empty_policy=zero``; the paper's choice is [U]).
3. (B) Each λ_i > κe gets a value η_i (``shrinker``; the reviews [N] call step B "the RMT-optimal
   estimate", its exact form in the paper is [U]):
   ``optimal`` (default) the Frobenius-optimal shrunk value
       η_i = √[(λ_i² − s²(n+m))² − 4s⁴nm] / λ_i,
   which equals θ̂·c_n·c_m with θ̂ = F⁻¹(λ) the BBP-inverted signal value and c_n, c_m the predicted
   cosines of the noisy singular vectors with the true ones (see ``bbp_inverse``, ``overlaps``);
   ``spike`` the plain spike estimate η_i = θ̂ (no overlap factor, larger than ``optimal``);
   ``hard`` η_i = λ_i (keep the top triplets as they are: truncated SVD at κe).
   With norm correction on, a layer that keeps one triplet comes out the same under all three (the
   rescale fixes its norm); they differ for rank ≥ 2 (relative weights of the triplets) and without
   norm correction (the magnitude).
4. D = Σ_kept η_i u_i v_iᵀ.
5. (C) Norm correction D ← D·‖Y‖_F/‖D‖_F (that the paper has this step: public reviews, via the
   notes [N]). Its rationale is attributed to the
   paper's "Theorem 1" only by the project's notes [N] (statement unverified; the proof in
   algorithms-detail.md §2 is ours [R]): per-layer norms kept and per-layer cosines not lowered ⇒
   the whole-model cosine does not drop.

Fast exact path
---------------
Only triplets with λ_i > κe matter, and in DP fine-tuning most layers usually have none.

* Threshold test: Lanczos on the small-side Gram operator YᵀY, ``test_iters`` steps from a random
  start. Its top Ritz value is a *lower bound* on λ₁², so a layer is skipped only when that bound is
  below ((1 − margin)·κe)²; the margin absorbs the remaining under-estimate, and a layer inside the
  margin goes on to the exact decomposition. Worst case over all spectra (Kuczyński & Woźniakowski
  1992, Lanczos with a random start): P(skip | λ₁ > κe) ≤ 1.648·√M·exp(−√ε·(2q − 1)), with
  ε = 1 − (1 − margin)², M the small side, q the steps. At the defaults (q = 20, margin 1%, M = 384)
  that bound is a loose 0.13: it covers adversarial spectra. On the hard case of the actual model —
  a spike 0–1% above κe sitting on the noise bulk — no layer was skipped in 222 trials on MiniLM's
  shapes (q = 16: one), and tests/test_denoise.py checks it. Raise ``test_iters`` for a tighter
  guarantee; each step costs two matrix-vector products per layer.
* Layers not skipped: block Lanczos (block Krylov with full reorthogonalisation and Rayleigh–Ritz)
  warm-started from the test's Ritz vectors. The block rank doubles while the block's last Ritz
  value is not clearly below κe; a layer is accepted once every kept triplet has residual
  ≤ ``RESIDUAL_TOL``·κe and the first dropped Ritz value is clearly below κe or converged. A layer
  that does not converge, or whose block would reach half its width, falls back to the exact
  small-side Gram + eigh decomposition ("fall back to exact when close").
* Batching: matrices are grouped by shape (n × m and m × n share a group after transposition). On
  a GPU each group runs as one batch; on a CPU the per-step work runs matrix by matrix, single
  threaded, because cache-resident matrix-vector products beat CPU batched matmul by ~3× here.

Numerics: fp32 throughout (bf16/fp16 inputs are upcast, the result cast back). Decomposition
failures (``LinAlgError`` or non-finite output) are retried in fp64, with other CUDA drivers, then on
the CPU; if all fail the noised gradient is returned unchanged with a warning and counted in the
diagnostics. The method never raises for a numerical failure and never returns a non-finite value
for a finite input.

Modules: ``rmt`` (the formulas), ``linalg`` (decompositions, Lanczos, block Krylov), ``rows`` (the
batched denoiser), ``method`` (the registered ``denoise`` method).
"""

from dpft.methods.denoise.method import Denoise
from dpft.methods.denoise.rmt import bbp_forward, bbp_inverse, bulk_edge, overlaps, shrink
from dpft.methods.denoise.rows import DenoiseInfo, DenoiseWarning, denoise_batch, denoise_matrix

__all__ = ["Denoise", "DenoiseInfo", "DenoiseWarning", "bbp_forward", "bbp_inverse", "bulk_edge", "denoise_batch",
           "denoise_matrix", "overlaps", "shrink"]
