"""`dpft audit`: an empirical lower bound on ε by canaries, in one training run.

We follow Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv 2305.08846). Two kinds of canary (`--canary`), one statistic:

**input** (default; black-box data, the whole data path):

1. m canaries: crafted examples of random whole-word vocabulary tokens with a random label (so
   no other example predicts them: every canary must be memorised to be fitted). Each is included
   in the training set independently with probability 1/2 (S_i ∈ {in, out}, a fair coin).
2. One run of the engine (`dpft.engine.prepare.prepare` / `dpft.engine.train.run`: same method, sampler, noise and
   accountant as `dpft train`) on task data + included canaries.
3. Score each canary from the released model θT and the public initial model θ0 (the seed's random
   init or the public checkpoint), so scoring is post-processing: by default how far the
   word-embedding rows of the canary's own words moved, ‖E_T[t] − E_0[t]‖ — only that canary's
   gradient and the noise move them; or (`--score loss`) its loss decrease. The loss score is weak
   on a tiny random-init model (the head's drift swamps it; measured AUC ≈ 0.5 even with the noise
   switched off), so the embedding score is the default.
   Threat model: the adversary adds examples to the data and reads the final model.

**gradient** (white-box, the mechanism itself; `GradientCanaries`): each canary is a per-sample
gradient the auditor chooses (a fixed sparse random direction of norm 100·C in the method's
privatised space), included with a fair coin, then Poisson-sampled at rate q at every step from the
run's own mechanism key, clipped by the method's `clip_factors` and added to the clipped sum through
the engine's seam (`dpft.engine.step.add_injected`), so the noise and post-processing treat it as a
real example's. Scores: `iterates` (default) the likelihood ratio of each canary's matched-filter
statistics over every step's privatised release (S+Z)/B — threat model: the adversary chooses the
canary's gradient and reads every noised release (all-iterates, white-box); `final` the same
statistic on θT − θ0 — the adversary reads only the final model (last-iterate). With `iterates`
the audit also checks the releases against the ledger's mechanism (`GradientCanaries.checks`: the
noise floor per tensor, and the canaries' signal against the sensitivity), and, unless the ledger
says privacy.noise=seeded, rebuilds the noise an attacker could derive from the public config and
subtracts it where it matches. Gradient canaries test the clip rule, noise, sampling and accounting;
not the per-sample gradient machinery (hooks/ghost/bk), which input canaries exercise.

Both then:

4. Guess "in" for the k+ highest scores and "out" for the k− lowest, abstain on the rest; count the
   correct guesses v out of r = k+ + k−.
5. If the mechanism is (ε, δ)-DP w.r.t. adding/removing one example, v is stochastically dominated
   by Binomial(r, e^ε/(1+e^ε)) up to a δ term (their main theorem and its δ > 0 form; for δ = 0
   this test is exactly a one-sided Clopper–Pearson bound on the guess precision). The empirical
   ε is the largest ε this test rejects at significance 1 − confidence.

Several (k+, k−) are tried and the significance is split between them (Bonferroni), so the
reported bound holds with the stated confidence whichever guess count looks best.

Privacy assumption audited: the claim in the audit run's ledger, (ε, δ) for add/remove-one
neighbours under Poisson sampling. The public parameters (q = B/N, σ, δ, the normaliser B) are
computed as if all m canaries were present, so they do not depend on the coin flips S (that N
would otherwise reveal Σ S_i). A lower bound far below the claim is *expected* (one-run audits of a
Gaussian mechanism are loose: docs/audit.md gives the bounds reached and an ideal auditor's); a
bound above the claim, or a failed mechanism check, is a bug. The exit status is 1 then.

Broken mechanisms are planted from the tests (tests/test_audit_planted.py, by monkeypatching the
engine's public seams); no flag, config key or module switch here breaks anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpft.errors import DpftError

log = logging.getLogger("dpft")

# Guess counts (k+, k−) as fractions of m: in-only and symmetric in/out guesses. Fixed before
# seeing any score, and Bonferroni-corrected, so picking the best of them keeps the confidence.
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)


# --------------------------------------------------------------------------- the statistics


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct out of r guesses] for an (ε, δ)-DP mechanism and m canaries (Steinke et al.):
    β = P[Binomial(r, p) ≥ v] with p = e^ε/(1+e^ε); for δ > 0 add 2mδ·max_i (P[Bin ≥ v−i] − β)/i."""
    from scipy.special import expit
    from scipy.stats import binom

    p = float(expit(epsilon))
    beta = float(binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1, r, p) - beta) / i, initial=0.0))
    return min(1.0, beta + alpha * 2 * m * delta)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest ε whose (ε, δ)-DP claim `v` of `r` correct guesses rejects at `significance`;
    0 if even ε = 0 is not rejected."""
    from scipy.optimize import brentq

    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    hi = 1.0
    while one_run_p_value(m, r, v, hi, delta) <= significance:
        hi *= 2
        if hi > 1e3:  # p → 1 as ε → ∞ whenever v ≤ r: unreachable, but never loop forever
            return float("inf")
    return float(brentq(lambda e: one_run_p_value(m, r, v, e, delta) - significance, hi / 2 if hi > 1 else 0.0,
                        hi, xtol=1e-6))


def guess_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k−) pairs tried: in-only guesses and symmetric in/out guesses, de-duplicated."""
    out = []
    for f in GUESS_FRACTIONS:
        k = max(1, int(round(f * m)))
        for pair in ((k, 0), (k, min(k, m - k))):
            if pair not in out and sum(pair) <= m:
                out.append(pair)
    return out


def membership_test(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float) -> dict:
    """Steinke et al.'s guessing game on the canary scores → the empirical ε lower bound."""
    from scipy.stats import binomtest

    m = len(scores)
    grid = guess_grid(m)
    significance = (1 - confidence) / len(grid)  # Bonferroni over the guess counts
    order = np.argsort(-scores, kind="stable")  # highest score first: most likely "in"
    tests = []
    for k_in, k_out in grid:
        correct = int(included[order[:k_in]].sum()) + (int((~included[order[m - k_out:]]).sum()) if k_out else 0)
        r = k_in + k_out
        tests.append({"k_in": k_in, "k_out": k_out, "guesses": r, "correct": correct,
                      "epsilon_lower_bound": epsilon_lower_bound(m, r, correct, delta, significance)})
    best = max(tests, key=lambda t: (t["epsilon_lower_bound"], t["correct"] / t["guesses"]))
    ci = binomtest(best["correct"], best["guesses"]).proportion_ci(confidence_level=confidence, method="exact")
    logit = lambda p: float("inf") if p >= 1 else (0.0 if p <= 0.5 else float(np.log(p / (1 - p))))  # noqa: E731
    # the best any run could show with this m: every guess of the largest test correct
    k_in, k_out = grid[-1]
    ceiling = epsilon_lower_bound(m, k_in + k_out, k_in + k_out, delta, significance)
    return {
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "confidence": confidence,
        "significance_per_test": significance,
        "guesses": best["guesses"],
        "correct": best["correct"],
        "k_in": best["k_in"],
        "k_out": best["k_out"],
        "precision": best["correct"] / best["guesses"],
        "precision_ci": [float(ci.low), float(ci.high)],  # Clopper–Pearson, two-sided
        "epsilon_ci_pure_dp": [logit(ci.low), logit(ci.high)],  # the precision CI read as ε (δ = 0)
        "epsilon_max_provable": ceiling,
        "tests": tests,
    }


# --------------------------------------------------------------------------- the canaries


@dataclass
class Canaries:
    """m candidate canaries and the fair coins S that decide which join the training set."""

    texts: list[tuple[str, ...]]
    labels: list[int]
    included: np.ndarray  # bool [m]

    @property
    def m(self) -> int:
        return len(self.labels)

    def rows(self):
        """The included canaries, as training rows (appended to the training split; Poisson
        sampling ignores order)."""
        from dpft.data.tasks import Split

        keep = np.flatnonzero(self.included)
        return Split([self.texts[i] for i in keep], [self.labels[i] for i in keep])


def _canary_words(tokenizer) -> list[str]:
    """Whole-word alphabetic vocabulary entries (WordPiece: no '##'; BPE/SentencePiece: the
    word-initial 'Ġ'/'▁' form), sorted for determinism."""
    vocab = tokenizer.get_vocab()
    marks = [mk for mk in ("Ġ", "▁") if sum(t.startswith(mk) for t in vocab) > len(vocab) // 10]
    words = set()
    for tok in vocab:
        if marks:
            if not tok.startswith(marks[0]):
                continue
            tok = tok[len(marks[0]):]
        if len(tok) >= 3 and tok.isascii() and tok.isalpha():
            words.add(tok.lower())
    return sorted(words)


def _check_task(task_cfg) -> list:
    kind = task_cfg.get("kind") or "classification"
    labels = list(task_cfg.get("labels") or [])
    if kind != "classification" or len(labels) < 2:
        raise DpftError(f"dpft audit needs a classification task (its canaries are labelled sentences); "
                        f"task {task_cfg.name} is {kind}" + ("" if kind != "classification" else " without labels"))
    return labels


def make_canaries(tokenizer, task_cfg, m: int, length: int, seed: int) -> Canaries:
    """Random-word canaries with random labels; words drawn without replacement while the
    vocabulary lasts, so most canary tokens appear in one canary only."""
    labels = _check_task(task_cfg)
    n_fields = len(task_cfg.get("text_fields") or [None])
    words = _canary_words(tokenizer)
    if len(words) < length:
        raise DpftError(f"the tokenizer has only {len(words)} whole-word tokens; cannot build canaries")
    rng = np.random.default_rng([int(seed), 0xA0D17])
    need = m * n_fields * length
    draw = rng.choice(len(words), size=need, replace=need > len(words)).reshape(m, n_fields, length)
    texts = [tuple(" ".join(words[j] for j in field) for field in c) for c in draw]
    return Canaries(texts, [int(x) for x in rng.integers(0, len(labels), size=m)],
                    rng.random(m) < 0.5)


SCORES = ("embedding", "loss")


def _encode_canaries(tokenizer, canaries: Canaries, max_length: int):
    from dpft.data.tasks import Split
    from dpft.engine.batches import encode

    return encode(tokenizer, Split(canaries.texts, canaries.labels), max_length)


def _canary_losses(model, enc, device, batch_size: int) -> np.ndarray:
    import torch

    from dpft.engine.step import per_sample_loss

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(enc), batch_size):
            out.append(per_sample_loss(model, enc.batch(range(start, min(start + batch_size, len(enc))), device)).cpu())
    model.train(was_training)
    return torch.cat(out).double().numpy()


def _word_embedding(model):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return None if emb is None else emb.weight


def score_canaries(kind: str, theta0, model, tokenizer, canaries: Canaries, max_length: int, device,
                   batch_size: int) -> np.ndarray:
    """Membership scores, higher = more likely trained on; functions of the released model and
    public information (θ0, the canaries) only.

    embedding (white-box): median over the canary's tokens of ‖E_T[t] − E_0[t]‖, how far its own
    word-embedding rows moved; canary words are (almost) never used by anything else, so only the
    canary's gradient — and the noise — moves them.
    loss (black-box): loss_θ0(c) − loss_θT(c), the canary's loss decrease."""
    import torch

    enc = _encode_canaries(tokenizer, canaries, max_length)
    if kind == "loss":
        return _canary_losses(theta0, enc, device, batch_size) - _canary_losses(model, enc, device, batch_size)
    e0, e1 = _word_embedding(theta0), _word_embedding(model)
    if e1 is None or not e1.requires_grad:
        raise DpftError("the embedding score needs trainable word embeddings (this config freezes them, e.g. "
                        "model.peft=lora); use --score loss")
    moved = (e1.detach().float().cpu() - e0.detach().float().cpu()).norm(dim=1)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    out = []
    for ids, mask in zip(enc.input_ids, enc.attention_mask):
        ids = ids[mask.bool()]
        ids = ids[~torch.isin(ids, special)]
        out.append(float(moved[ids].median()) if len(ids) else 0.0)
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------- gradient canaries

CANARY_KINDS = ("input", "gradient")
GRADIENT_SCORES = ("iterates", "final")
THREAT_MODELS = {
    "iterates": "white-box, all iterates: the auditor chooses each canary's per-sample gradient and reads every "
                "step's privatised release (S+Z)/B, the input of the method's post-processing",
    "final": "white-box, last iterate: the auditor chooses each canary's per-sample gradient and reads only the "
             "initial and the final model",
}
# A canary's gradient norm as a multiple of C: far above any clip, so a clip that lets more than the
# ledger's sensitivity through (up to this factor) shows in the release.
CANARY_NORM = 100.0
# Coordinates per canary in each tensor: at most this many, and at most d // m, so that no two
# canaries share one.
MAX_COORDS = 64
# Significance of each white-box mechanism check (noise floor; canary signal). The bugs they target
# show at z-scores far beyond it; it keeps their false alarms negligible beside the bound's 1 − confidence.
CHECK_SIGNIFICANCE = 1e-6


class _Rows:
    """The canaries sampled at one step, in the form `dpft.engine.step.add_injected` takes."""

    def __init__(self, canaries: "GradientCanaries", sel):
        self.c, self.sel = canaries, sel

    def sq_norms(self):
        return self.c.sq[:, self.sel]

    def weighted_sum(self, factors) -> dict:
        import torch

        t0 = time.perf_counter()
        c, sel = self.c, self.sel
        f = factors.to(c.values.dtype)
        # one factor per canary ([k]), or per canary and tensor ([P, k]: ANADP's per-group clips)
        per_coord = (f.unsqueeze(1) if f.dim() == 1
                     else f[c.tid[sel], torch.arange(len(sel), device=f.device).unsqueeze(1)])
        flat = torch.zeros(c.dim, dtype=c.values.dtype, device=c.values.device)
        flat.index_add_(0, c.coords[sel].reshape(-1), (c.values[sel] * per_coord).reshape(-1))
        c.seconds += time.perf_counter() - t0
        return {n: flat[o:o + k].view(shape) for n, o, k, shape in zip(c.names, c.offsets, c.sizes, c.shapes)}


class GradientCanaries:
    """m gradient canaries for the white-box one-run audit (`dpft audit --canary gradient`).

    Canary i is a fixed sparse direction u_i in the concatenated *privatised* space (each trainable
    tensor in `method.space_shape`, i.e. grape's projected space for its projected layers): in every
    tensor of d ≥ m entries, k = min(MAX_COORDS, d // m) random coordinates with random signs,
    disjoint from every other canary's, and equal norm in each such tensor, so that a per-group clip
    (ANADP's) binds in every group the canary touches. Smaller tensors (biases, LayerNorms) carry
    no canary: shared coordinates would carry the real examples' persistent gradient into many
    canaries' scores alike (if no tensor has d ≥ m, the largest is shared and `disjoint` is false).
    Its per-sample gradient is g_i = CANARY_NORM·C·u_i at every step. Its fair coin S_i decides
    whether it is in the data set; at each step an included canary joins the batch with probability q, the
    run's sample rate, drawn from the run's own mechanism key (`NoiseSource.generator("audit/canaries",
    t)`: secret under privacy.noise=secure, independent of the real rows' mask). A sampled canary goes
    through `dpft.engine.step.add_injected`: the method's `clip_factors`, then the same noise and
    post-processing as the real examples' clipped sum. The public N counts all m candidates.

    Scores (functions of the releases and the public u_i only, never of S or of the sampling):
    z_{t,i} = Σ_j (V_j/s_j)(u_ij/s_j) / ‖u_i/s‖ on the step's release V = (S+Z)/B, s_j the claimed
    per-entry noise std of V on coordinate j's tensor; under the claim the noise part is exactly
    N(0, 1) and a sampled canary adds at most ‖h_i/s‖ ≤ 1/σ (h_i its clipped contribution; for
    ANADP's per-group clips and noise Σ_g C_g²/s_g² = 1/σ²). ``iterates`` scores
    Σ_t log(1 − q + q·exp(z_{t,i}/σ − 1/(2σ²))), the likelihood ratio of a canary sampled with
    probability q against one never present; ``final`` scores z_i on θ_T − θ_0 instead (only
    tensors whose privatised space is the parameter itself, the scale of each tensor's change
    estimated by its median absolute value)."""

    def __init__(self, m: int, seed: int, score: str):
        self.m, self.score, self.seed = m, score, int(seed)
        rng = np.random.default_rng([self.seed, 0xA0D17, 1])
        self.included = rng.random(m) < 0.5
        self._rng = rng
        self.z: list = []
        self.times_sampled = np.zeros(m, dtype=np.int64)
        self.sampled: list[np.ndarray] = []  # per step, which canaries were injected (the checks only)
        self.regenerated = 0
        self.guess = None  # noise source an auditor could rebuild from the public config
        self.zero_noise: list[str] = []
        self.seconds = 0.0  # wall time of the auditor's own work (injection rows, scoring, noise rebuild)

    def attach(self, method, params: dict, privacy) -> None:
        """Lay the canaries out in the method's privatised space (after `method.setup`)."""
        import torch

        self.method, self.params = method, params
        self.names = list(params)
        self.shapes = [torch.Size(method.space_shape(n, p)) for n, p in params.items()]
        self.sizes = [int(s.numel()) for s in self.shapes]
        self.offsets = [int(x) for x in np.cumsum([0] + self.sizes[:-1])]
        self.dim = int(sum(self.sizes))
        eligible = [self.score != "final" or tuple(s) == tuple(p.shape) for s, p in zip(self.shapes, params.values())]
        if not any(eligible):
            raise DpftError("no trainable tensor is privatised in its own shape: --score final has nothing to read")
        m = self.m
        # tensors with room for m disjoint canaries: a coordinate shared between canaries carries the
        # real examples' gradient into all their scores alike, which the signal check cannot see
        tensors = [p for p, e in enumerate(eligible) if e and self.sizes[p] >= m]
        if not tensors:  # none: the largest, shared
            tensors = [max((p for p, e in enumerate(eligible) if e), key=lambda p: self.sizes[p])]
        blocks, tids, signs, disjoint = [], [], [], True
        for p in tensors:
            k = max(1, min(MAX_COORDS, self.sizes[p] // m))
            if self.sizes[p] >= m * k:
                local = self._rng.permutation(self.sizes[p])[:m * k]
            else:
                local, disjoint = self._rng.integers(0, self.sizes[p], size=m * k), False
            blocks.append(self.offsets[p] + local.reshape(m, k))
            tids.append(np.full((m, k), p))
            signs.append(self._rng.choice([-1.0, 1.0], size=(m, k)) / np.sqrt(k * len(tensors)))
        coords = np.concatenate(blocks, axis=1)
        device = next(iter(params.values())).device
        self.k, self.disjoint = coords.shape[1], disjoint
        self.coords = torch.as_tensor(coords, dtype=torch.long, device=device)
        self.unit = torch.as_tensor(np.concatenate(signs, axis=1), dtype=torch.float32, device=device)
        self.norm = CANARY_NORM * float(privacy.clip_norm)
        self.values = self.unit * self.norm
        self.tid = torch.as_tensor(np.concatenate(tids, axis=1), dtype=torch.long, device=device)
        sq = torch.zeros(len(self.names), m, dtype=torch.float32, device=device)
        sq.index_put_((self.tid, torch.arange(m, device=device).unsqueeze(1).expand_as(self.tid)), self.values ** 2,
                      accumulate=True)
        self.sq = sq
        self.q, self.sigma = float(privacy.sample_rate), float(privacy.sigma)
        self.b = float(privacy.expected_batch_size)
        self._included = torch.as_tensor(self.included, device=device)
        self.chi2 = np.zeros(len(self.names))
        self.dof = np.zeros(len(self.names))
        self.theta0 = torch.cat([p.detach().float().reshape(-1) if e else p.new_zeros(0, dtype=torch.float32)
                                 for p, e in zip(params.values(), eligible)]) if self.score == "final" else None
        self._eligible = eligible

    def draw(self, step: int, noise):
        """This step's Poisson draw of the included canaries, as injection rows (None if none)."""
        import torch

        t0 = time.perf_counter()
        gen = noise.source.generator("audit/canaries", step) if hasattr(noise, "source") else noise
        u = torch.rand(self.m, generator=gen).to(self._included.device)
        sel = torch.nonzero(self._included & (u < self.q)).reshape(-1)
        self.times_sampled[sel.cpu().numpy()] += 1
        mask = np.zeros(self.m, dtype=bool)
        mask[sel.cpu().numpy()] = True
        self.sampled.append(mask)
        self.seconds += time.perf_counter() - t0
        return _Rows(self, sel) if len(sel) else None

    def _zscores(self, V, s):
        """z_i = Σ_j (V_j/s_j)(u_ij/s_j)/‖u_i/s‖ for the flat vector V and per-tensor scale s."""
        inv = (1.0 / s.double())[self.tid]  # [m, k]; float64: a near-zero scale must not overflow
        u = self.unit.double()
        a = (V[self.coords].double() * u * inv * inv).sum(1)
        return a / (u * inv).pow(2).sum(1).sqrt()

    def observe(self, grads: dict, step: int) -> None:
        """Score this step's release (S + Z)/B: z_{t,i}, and the noise-floor statistic per tensor."""
        import torch

        t0 = time.perf_counter()
        V = torch.cat([grads[n].detach().float().reshape(-1) for n in self.names])
        stds = self.method.noise_std()
        s = torch.tensor([float(stds[n]) / self.b for n in self.names], dtype=torch.float32, device=V.device)
        for n, x in zip(self.names, s.tolist()):
            if x <= 0 and n not in self.zero_noise:
                self.zero_noise.append(n)
        if self.guess is not None:  # noise an auditor rebuilds from the public seed: subtract it
            sn = self.guess.for_step(step)
            zhat = torch.cat([z.reshape(-1).float() for z in sn.gaussians(
                [(shape, float(stds[n])) for n, shape in zip(self.names, self.shapes)], V.device)]) / self.b
            resid = V - zhat
            if float(resid.double().pow(2).sum()) < 0.25 * float(V.double().pow(2).sum()):
                V = resid
                self.regenerated += 1
            elif self.regenerated == 0:  # the first step does not match: a key from the config would have
                self.guess = None       # matched it; stop paying for the rebuild (a full noise draw a step)
        # a tensor claimed noiseless (a check failure of its own) is scored at a millionth of the others' scale
        floor = 1e-6 * float(s[s > 0].min()) if bool((s > 0).any()) else 1.0
        s = torch.where(s > 0, s, torch.full_like(s, floor))
        for p, (o, k) in enumerate(zip(self.offsets, self.sizes)):
            self.chi2[p] += float((V[o:o + k].double() / float(s[p])).pow(2).sum())
            self.dof[p] += k
        self.z.append(self._zscores(V, s).cpu().double().numpy())
        self.seconds += time.perf_counter() - t0

    def scores(self) -> np.ndarray:
        import torch

        if self.score == "final":
            theta = torch.cat([p.detach().float().reshape(-1) for p, e in zip(self.params.values(), self._eligible)
                               if e])
            delta = torch.zeros(self.dim, dtype=torch.float32, device=theta.device)
            pos = 0
            s = torch.ones(len(self.names), dtype=torch.float32, device=theta.device)
            for p, (o, k, e) in enumerate(zip(self.offsets, self.sizes, self._eligible)):
                if e:
                    d = self.theta0[pos:pos + k] - theta[pos:pos + k]  # descent: minus the change
                    delta[o:o + k] = d
                    scale = float(d.abs().median()) / 0.6745  # the median absolute change, as a std
                    s[p] = scale if scale > 0 else max(float(d.abs().max()), 1.0) * 1e-6
                    pos += k
            return self._zscores(delta, s).cpu().double().numpy()
        z = np.stack(self.z)  # [T, m]
        mu = 1.0 / self.sigma
        log_out = np.log1p(-self.q) if self.q < 1 else -np.inf
        return np.logaddexp(log_out, np.log(self.q) + mu * z - mu * mu / 2).sum(0)

    def checks(self) -> dict:
        """White-box conformance of the releases with the ledger's mechanism (``iterates`` only).

        noise floor: per tensor, Σ_t ‖V_t/s_t‖² ≥st χ²(T·d) under the claim (the noise is
        N(0, s²) per entry and independent of S given the past; a non-zero mean only makes the sum
        larger, by Anderson's theorem), so a sum far below χ²(T·d)'s lower tail means less noise
        than claimed; Bonferroni over tensors.
        canary signal: the auditor knows when it injected each canary (the ε bound never uses it). For
        an included canary first sampled at step t1 > 1, d_i = z_{t1,i} − mean_{t<t1} z_{t,i}. Until t1
        the canary has never touched the model, and its random signs are independent of everything
        else, so the real examples' cross-talk on its coordinates has mean 0 at every t ≤ t1 (no
        feedback), and the subtraction removes its persistent part; under the claim E[d_i] ≤ 1/σ (a
        sampled canary adds at most ‖h_i/s‖ ≤ 1/σ). One-sided test of the precision-weighted mean of
        the d_i (weights 1/(1 + 1/(t1−1))); standard error from the d_i's own spread, canaries being
        independent (disjoint coordinates)) against 1/σ, normal approximation."""
        from scipy.stats import chi2, norm

        out = {"significance": CHECK_SIGNIFICANCE}
        p_noise = [float(chi2.cdf(x, d)) for x, d in zip(self.chi2, self.dof)]
        worst = int(np.argmin(p_noise))
        out["noise_floor"] = {
            "tensor": self.names[worst], "ratio": float(self.chi2[worst] / self.dof[worst]),
            "p_value": p_noise[worst], "tensors": len(p_noise),
            "zero_noise_tensors": list(self.zero_noise),
            "failed": bool(self.zero_noise) or p_noise[worst] < CHECK_SIGNIFICANCE / len(p_noise),
        }
        z, sampled = np.stack(self.z), np.stack(self.sampled)  # [T, m]
        first = np.where(sampled.any(0), sampled.argmax(0), -1)  # 0-based step of the first injection
        use = self.included & (first >= 1)
        bound = 1.0 / self.sigma
        if use.sum() >= 10:
            idx = np.flatnonzero(use)
            t1 = first[idx]
            before = np.cumsum(z, axis=0)[t1 - 1, idx] / t1  # mean of z over the steps before t1
            d = z[t1, idx] - before
            w = 1.0 / (1.0 + 1.0 / t1)
            mean = float((w * d).sum() / w.sum())
            se = float(np.sqrt((w ** 2 * (d - mean) ** 2).sum()) / w.sum())
            p_sig = float(norm.sf((mean - bound) / se)) if se > 0 else float(mean <= bound)
        else:  # too few canaries first sampled after step 1: no test
            mean, p_sig = None, 1.0
        out["canary_signal"] = {
            "observed": mean, "claimed_max": bound, "ratio": None if mean is None else mean / bound, "p_value": p_sig,
            "canaries": int(use.sum()), "failed": p_sig < CHECK_SIGNIFICANCE,
        }
        out["failed"] = out["noise_floor"]["failed"] or out["canary_signal"]["failed"]
        return out


class CanaryMethod:
    """The run's method with gradient canaries: every attribute is the wrapped method's, plus the
    engine's injection seam (`injected_gradients`) and an observer of each step's privatised
    release, which `dp_step` hands to `postprocess`."""

    def __init__(self, inner, canaries: GradientCanaries):
        self._inner, self._canaries = inner, canaries

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_inner", "_canaries"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def setup(self, model, params, privacy) -> None:
        self._inner.setup(model, params, privacy)
        self._canaries.attach(self._inner, params, privacy)

    def injected_gradients(self, step: int, noise):
        return self._canaries.draw(step, noise)

    def postprocess(self, grads, noise_std, step):
        self._canaries.observe(grads, step)
        return self._inner.postprocess(grads, noise_std, step)


# --------------------------------------------------------------------------- the command


@dataclass
class AuditResult:
    path: Path
    result: dict
    skipped: bool = False


def audit_dir(output_dir, run_id: str, settings: dict):
    """The dpft.store.AuditDir of auditing run `run_id` with `settings` (its id hashes both)."""
    from dpft import store

    blob = json.dumps({"run_id": run_id, **settings}, sort_keys=True)
    return store.Store(output_dir).audit(hashlib.sha256(blob.encode()).hexdigest()[:12])


def run_audit(spec, canaries: int, length: int, confidence: float, score: str | None = None,
              force: bool = False, kind: str = "input") -> AuditResult:
    """Train the composed config once with canaries through the shared engine, score them, and
    write ``<output_dir>/audits/<id>/audit.json`` (plus the run's config, metrics and summary).
    `kind`: "input" (random-word sentences, scored by `score` embedding | loss) or "gradient"
    (auditor-chosen per-sample gradients, scored on the iterates | the final model)."""
    if kind not in CANARY_KINDS:
        raise DpftError(f"--canary must be one of {', '.join(CANARY_KINDS)}, got {kind!r}")
    scores_ok = SCORES if kind == "input" else GRADIENT_SCORES
    score = scores_ok[0] if score is None else score
    if canaries < 10:
        raise DpftError(f"--canaries must be >= 10, got {canaries}")
    if length < 1:
        raise DpftError(f"--canary-length must be >= 1, got {length}")
    if not 0 < confidence < 1:
        raise DpftError(f"--confidence must be in (0, 1), got {confidence}")
    if score not in scores_ok:
        raise DpftError(f"--score for --canary {kind} must be one of {', '.join(scores_ok)}, got {score!r}")
    if kind == "input":
        # "unsafe_break" stays in the hash so that existing audit ids do not change
        settings = {"canaries": canaries, "canary_length": length, "confidence": confidence, "score": score,
                    "unsafe_break": None}
    else:
        settings = {"canary": kind, "canaries": canaries, "confidence": confidence, "score": score,
                    "canary_norm": CANARY_NORM, "max_coords": MAX_COORDS}
    adir = audit_dir(spec.cfg.paths.output_dir, spec.run_id, settings)
    previous = adir.result()
    if previous is not None and not force:
        return AuditResult(adir.path, previous, skipped=True)
    if kind == "input":
        return _run_input(spec, adir, settings, canaries, length, confidence, score)
    return _run_gradient(spec, adir, settings, canaries, confidence, score)


def _train(spec, prep, adir) -> dict:
    from dpft.engine import train as engine
    from dpft.engine.ledger import config_yaml
    from dpft.tracking import Progress, Sinks

    adir.begin(config_yaml(spec))  # a previous attempt is archived, as `dpft train` does
    sinks = Sinks(adir.metrics_sink(), Progress(str(spec.cfg.runtime.progress), prep.steps, f"audit {spec.slug}"))
    try:
        return engine.run(prep, adir, sinks)
    finally:
        sinks.close()


def _finish(spec, prep, adir, settings: dict, summary: dict, scores: np.ndarray, included: np.ndarray,
            confidence: float, extra: dict, rows: list[dict], checks: dict | None = None) -> dict:
    from sklearn.metrics import roc_auc_score

    from dpft.engine.ledger import meta as run_meta

    ledger = summary["privacy"]
    delta = float(ledger["delta"]) if ledger.get("private") else 0.0
    test = membership_test(scores, included, delta, confidence)
    claimed = float(ledger["epsilon"])
    exceeds = bool(test["epsilon_lower_bound"] > claimed)
    result = {
        "run_id": spec.run_id,
        "slug": spec.slug,
        "method": summary["method"],
        "overrides": list(spec.overrides),
        **extra,
        "canaries": len(scores),
        "included": int(included.sum()),
        "claimed_epsilon": claimed,
        "delta": delta,
        "sigma": ledger.get("sigma"),
        "steps": summary["steps"],
        "sample_rate": ledger.get("sample_rate"),
        "auc": float(roc_auc_score(included, scores)),
        **test,
        "exceeds_claim": exceeds,
        "mechanism_checks": checks,
        "violation": exceeds or bool(checks and checks["failed"]),
        "refutable": bool(test["epsilon_max_provable"] > claimed),
    }
    adir.write_canaries([{**r, "included": bool(s), "score": float(sc)} for r, s, sc in zip(rows, included, scores)])
    adir.write_overrides(list(spec.overrides))
    adir.write_meta(run_meta(prep, "done", overrides=list(spec.overrides), audit=settings))
    adir.write_result(result)  # last: its presence means the audit finished
    return result


def _run_input(spec, adir, settings, canaries, length, confidence, score) -> AuditResult:
    import copy

    from dpft.engine.prepare import prepare
    from dpft.models import load_tokenizer

    cfg = spec.cfg
    _check_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    cans = make_canaries(tokenizer, cfg.task, canaries, length, int(cfg.seed))
    # bad input fails here, before anything is written; N (public) counts all m candidates
    prep = prepare(spec, extra_train=cans.rows(), extra_public_n=cans.m)
    emb = _word_embedding(prep.model)
    if score == "embedding" and (emb is None or not emb.requires_grad):
        raise DpftError("the embedding score needs trainable word embeddings (this config freezes them, e.g. "
                        "model.peft=lora); use --score loss")
    theta0 = copy.deepcopy(prep.model)  # public: the seed's random init (or the public checkpoint)
    summary = _train(spec, prep, adir)
    scores = score_canaries(score, theta0, prep.model, tokenizer, cans, int(cfg.task.max_length), prep.device,
                            int(cfg.runtime.eval_batch_size))
    extra = {"canary": "input",
             "procedure": "one-run canary audit (Steinke, Nasr & Jagielski 2023), input-space canaries, "
                          "Bonferroni over guess counts",
             "threat_model": "black-box data: the auditor adds examples (random-word sentences) and reads the "
                             "final model" + (" (its word embeddings)" if score == "embedding" else " (its loss)"),
             "score": score, "canary_length": length}
    rows = [{"text": list(t), "label": y} for t, y in zip(cans.texts, cans.labels)]
    return AuditResult(adir.path, _finish(spec, prep, adir, settings, summary, scores, cans.included, confidence,
                                          extra, rows))


def _run_gradient(spec, adir, settings, canaries, confidence, score) -> AuditResult:
    from dpft.engine import noise
    from dpft.engine.prepare import prepare

    cfg = spec.cfg
    cans = GradientCanaries(canaries, int(cfg.seed), score)
    prep = prepare(spec, extra_public_n=cans.m)  # N counts the m candidates; no rows are added
    if not prep.method.private:
        raise DpftError(f"method={prep.method.name} claims no ε (∞): gradient canaries audit a DP step's clip and "
                        "noise, which it does not have; use --canary input")
    mode = str(cfg.privacy.get("noise", "secure"))
    if mode != "seeded":  # a mechanism claiming secret noise: try the noise anyone could rebuild from the config
        cans.guess = noise.NoiseSource.create("seeded", int(cfg.seed), spec.run_id)
        cans.guess.mode = mode  # drawn as the claimed mode draws (secure: Opacus' four-draw sum)
    prep.method = CanaryMethod(prep.method, cans)
    summary = _train(spec, prep, adir)
    scores = cans.scores()
    checks = cans.checks() if score == "iterates" else None
    extra = {"canary": "gradient",
             "procedure": "one-run canary audit (Steinke, Nasr & Jagielski 2023), white-box gradient canaries, "
                          "Bonferroni over guess counts",
             "threat_model": THREAT_MODELS[score], "score": score,
             "canary_norm": cans.norm, "coords_per_canary": cans.k, "disjoint": cans.disjoint,
             "privatised_dim": cans.dim,
             "projected_tensors": [n for n, sh, p in zip(cans.names, cans.shapes, cans.params.values())
                                   if tuple(sh) != tuple(p.shape)],
             "noise_regenerated_steps": cans.regenerated,
             "noise_guess": None if cans.guess is None else "privacy.noise=seeded key of this config",
             "in_canaries_never_sampled": int(((cans.times_sampled == 0) & cans.included).sum()),
             "auditor_seconds": cans.seconds, "train_seconds": summary.get("wall_time_s")}
    rows = [{"canary": i, "times_sampled": int(t)} for i, t in enumerate(cans.times_sampled)]
    return AuditResult(adir.path, _finish(spec, prep, adir, settings, summary, scores, cans.included, confidence,
                                          extra, rows, checks))


def rich_table(res: AuditResult):
    from rich.markup import escape
    from rich.table import Table

    r = res.result
    fmt = lambda v: "∞" if v == float("inf") or v == "inf" else f"{v:.3f}"  # noqa: E731
    # escape: rich reads "[a692c970dac7]" as a markup tag and prints nothing
    table = Table(title=escape(f"dpft audit: {r['slug']}  [{r['run_id']}]"), show_header=False, title_justify="left")
    table.add_row("claimed ε (δ)", f"{fmt(r['claimed_epsilon'])}  (δ={r['delta']:.3g}, σ={r['sigma']:.4g}, "
                  f"q={r['sample_rate']:.4g}, {r['steps']} steps)" if r["sigma"] is not None else "∞ (non-private)")
    kind = r.get("canary", "input")
    what = (f"{r['canary_length']} words each" if kind == "input" else
            f"gradients of norm {r['canary_norm']:.3g} on {r['coords_per_canary']} coordinates each, "
            f"score {r['score']}")
    table.add_row("canaries", f"{r['canaries']} ({r['included']} in, {r['canaries'] - r['included']} out), {what}")
    if r.get("noise_regenerated_steps"):
        table.add_row("[bold red]noise rebuilt[/]", f"[bold red]{r['noise_regenerated_steps']} steps' noise rebuilt "
                      "from the public config and subtracted[/]")
    table.add_row("best guess", f"{r['correct']}/{r['guesses']} correct (top {r['k_in']} in, bottom {r['k_out']} out)")
    lo, hi = r["precision_ci"]
    table.add_row("precision", f"{r['precision']:.3f}  ({100 * r['confidence']:.0f}% Clopper–Pearson [{lo:.3f}, {hi:.3f}])")
    table.add_row("score AUC (in vs out)", f"{r['auc']:.3f}")
    exceeds = r.get("exceeds_claim", r["violation"])
    verdict = ("[bold red]exceeds the claim[/]" if exceeds else "[green]below the claim[/]")
    table.add_row(f"empirical ε ≥ ({100 * r['confidence']:.0f}%)", f"[bold]{fmt(r['epsilon_lower_bound'])}[/]  {verdict}")
    table.add_row("most this audit can show", fmt(r["epsilon_max_provable"])
                  + ("" if r["refutable"] else "  (≤ claimed ε: use more canaries or audit a smaller ε)"))
    checks = r.get("mechanism_checks")
    if checks:
        nf, cs = checks["noise_floor"], checks["canary_signal"]
        bad = lambda f: "[bold red]FAILED[/]" if f else "[green]ok[/]"  # noqa: E731
        table.add_row("noise floor", f"{bad(nf['failed'])}  lowest ‖release‖²/claimed noise {nf['ratio']:.3f} "
                      f"({nf['tensor']}, p={nf['p_value']:.2g})"
                      + (f"; no noise on {', '.join(nf['zero_noise_tensors'])}" if nf["zero_noise_tensors"] else ""))
        table.add_row("canary signal", f"{bad(cs['failed'])}  " + (
            "not tested (too few canaries sampled)" if cs["observed"] is None else
            f"{cs['observed']:.3f} per sampled step vs at most 1/σ = {cs['claimed_max']:.3f} "
            f"(×{cs['ratio']:.2f}, p={cs['p_value']:.2g}, {cs['canaries']} canaries)"))
    from dpft.store import AuditDir

    table.caption = str(AuditDir(res.path).result_path)
    table.caption_justify = "left"
    return table
