"""`dpft audit`: an empirical lower bound on ε by canaries, in one training run.

We follow Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv 2305.08846), black-box input-space setting:

1. m canaries: crafted examples of random whole-word vocabulary tokens with a random label (so
   no other example predicts them: every canary must be memorised to be fitted). Each is included
   in the training set independently with probability 1/2 (S_i ∈ {in, out}, a fair coin).
2. One run of the engine (`dpft.engine.prepare.prepare` / `dpft.engine.train.run`: same method, sampler, noise and
   accountant as `dpft train`) on task data + included canaries.
3. Score each canary from the released model θT and the public initial model θ0 (the seed's random
   init or the public checkpoint), so scoring is post-processing: by default (white-box) how far
   the word-embedding rows of the canary's own words moved, ‖E_T[t] − E_0[t]‖ — only that canary's
   gradient and the noise move them; or (black-box, `--score loss`) its loss decrease. The loss
   score is weak on a tiny random-init model (the head's drift swamps it; measured AUC ≈ 0.5 even
   with the noise switched off), so the white-box score is the default.
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
would otherwise reveal Σ S_i). A lower bound far below the claim is *expected* (the audit is weak
for small ε, and input-space canaries are not worst case); a bound above the claim is a bug.

`UNSAFE_BREAK` is a test-only hook (tests/test_audit.py) that breaks the mechanism of the audit run
so the test can show the audit catches it; no CLI flag or config key reaches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpft.errors import DpftError

log = logging.getLogger("dpft")

# Test-only: "noise-off" (noise std 0, still accounted as σ). Never set outside tests; an audit run
# with it set is marked UNSAFE in audit.json and in the table.
UNSAFE_BREAK: str | None = None
BREAKS = ("noise-off",)

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


def _break_mechanism(method, how: str) -> None:
    """UNSAFE, test-only (see UNSAFE_BREAK): make the method release more than it accounts for."""
    if how == "noise-off":
        method.noise_std = lambda: {name: 0.0 for name in method.params}
    else:
        raise ValueError(f"unknown mechanism break {how!r}; one of {BREAKS}")


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


def run_audit(spec, canaries: int, length: int, confidence: float, score: str = "embedding",
              force: bool = False) -> AuditResult:
    """Train the composed config once with canaries through the shared engine, score them, and
    write ``<output_dir>/audits/<id>/audit.json`` (plus the run's config, metrics and summary)."""
    import copy

    from dpft.engine import train as engine
    from dpft.engine.ledger import config_yaml
    from dpft.engine.ledger import meta as run_meta
    from dpft.engine.prepare import prepare
    from dpft.models import load_tokenizer
    from dpft.tracking import Progress, Sinks

    if canaries < 10:
        raise DpftError(f"--canaries must be >= 10, got {canaries}")
    if length < 1:
        raise DpftError(f"--canary-length must be >= 1, got {length}")
    if not 0 < confidence < 1:
        raise DpftError(f"--confidence must be in (0, 1), got {confidence}")
    if score not in SCORES:
        raise DpftError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    cfg = spec.cfg
    settings = {"canaries": canaries, "canary_length": length, "confidence": confidence, "score": score,
                "unsafe_break": UNSAFE_BREAK}
    adir = audit_dir(cfg.paths.output_dir, spec.run_id, settings)
    path = adir.path
    previous = adir.result()
    if previous is not None and not force:
        return AuditResult(path, previous, skipped=True)

    _check_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    cans = make_canaries(tokenizer, cfg.task, canaries, length, int(cfg.seed))
    # q, σ and δ count all m candidates, whichever are in (public parameters independent of S)
    prep = prepare(spec, extra_train=cans.rows(), extra_public_n=cans.m)  # bad input fails here, before anything is written
    emb = _word_embedding(prep.model)
    if score == "embedding" and (emb is None or not emb.requires_grad):
        raise DpftError("the embedding score needs trainable word embeddings (this config freezes them, e.g. "
                        "model.peft=lora); use --score loss")
    if UNSAFE_BREAK:
        log.warning("UNSAFE: the audit run's mechanism is deliberately broken (%s)", UNSAFE_BREAK)
        _break_mechanism(prep.method, UNSAFE_BREAK)
    theta0 = copy.deepcopy(prep.model)  # public: the seed's random init (or the public checkpoint)

    adir.begin(config_yaml(spec))
    sinks = Sinks(adir.metrics_sink(), Progress(str(cfg.runtime.progress), prep.steps, f"audit {spec.slug}"))
    try:
        summary = engine.run(prep, adir, sinks)
    finally:
        sinks.close()

    scores = score_canaries(score, theta0, prep.model, tokenizer, cans, int(cfg.task.max_length), prep.device,
                            int(cfg.runtime.eval_batch_size))
    ledger = summary["privacy"]
    delta = float(ledger["delta"]) if ledger.get("private") else 0.0
    test = membership_test(scores, cans.included, delta, confidence)
    claimed = float(ledger["epsilon"])
    from sklearn.metrics import roc_auc_score

    result = {
        "run_id": spec.run_id,
        "slug": spec.slug,
        "method": summary["method"],
        "overrides": list(spec.overrides),
        "procedure": "one-run canary audit (Steinke, Nasr & Jagielski 2023), input-space canaries, "
                     "Bonferroni over guess counts",
        "score": score,
        "canaries": canaries,
        "canary_length": length,
        "included": int(cans.included.sum()),
        "claimed_epsilon": claimed,
        "delta": delta,
        "sigma": ledger.get("sigma"),
        "steps": summary["steps"],
        "sample_rate": ledger.get("sample_rate"),
        "auc": float(roc_auc_score(cans.included, scores)),
        **test,
        "violation": bool(test["epsilon_lower_bound"] > claimed),
        "refutable": bool(test["epsilon_max_provable"] > claimed),
        "unsafe_broken_mechanism": UNSAFE_BREAK,
    }
    adir.write_canaries([{"text": list(t), "label": y, "included": bool(s), "score": float(sc)}
                         for t, y, s, sc in zip(cans.texts, cans.labels, cans.included, scores)])
    adir.write_overrides(list(spec.overrides))
    adir.write_meta(run_meta(prep, "done", overrides=list(spec.overrides), audit=settings))
    adir.write_result(result)  # last: its presence means the audit finished
    return AuditResult(path, result)


def rich_table(res: AuditResult):
    from rich.markup import escape
    from rich.table import Table

    r = res.result
    fmt = lambda v: "∞" if v == float("inf") or v == "inf" else f"{v:.3f}"  # noqa: E731
    # escape: rich reads "[a692c970dac7]" as a markup tag and prints nothing
    table = Table(title=escape(f"dpft audit: {r['slug']}  [{r['run_id']}]"), show_header=False, title_justify="left")
    if r.get("unsafe_broken_mechanism"):
        table.add_row("[bold red]UNSAFE[/]", f"[bold red]mechanism deliberately broken: {r['unsafe_broken_mechanism']}[/]")
    table.add_row("claimed ε (δ)", f"{fmt(r['claimed_epsilon'])}  (δ={r['delta']:.3g}, σ={r['sigma']:.4g}, "
                  f"q={r['sample_rate']:.4g}, {r['steps']} steps)" if r["sigma"] is not None else "∞ (non-private)")
    table.add_row("canaries", f"{r['canaries']} ({r['included']} in, {r['canaries'] - r['included']} out), "
                  f"{r['canary_length']} words each")
    table.add_row("best guess", f"{r['correct']}/{r['guesses']} correct (top {r['k_in']} in, bottom {r['k_out']} out)")
    lo, hi = r["precision_ci"]
    table.add_row("precision", f"{r['precision']:.3f}  ({100 * r['confidence']:.0f}% Clopper–Pearson [{lo:.3f}, {hi:.3f}])")
    table.add_row("score AUC (in vs out)", f"{r['auc']:.3f}")
    verdict = ("[bold red]exceeds the claim[/]" if r["violation"] else "[green]below the claim[/]")
    table.add_row(f"empirical ε ≥ ({100 * r['confidence']:.0f}%)", f"[bold]{fmt(r['epsilon_lower_bound'])}[/]  {verdict}")
    table.add_row("most this audit can show", fmt(r["epsilon_max_provable"])
                  + ("" if r["refutable"] else "  (≤ claimed ε: use more canaries or audit a smaller ε)"))
    from dpft.store import AuditDir

    table.caption = str(AuditDir(res.path).result_path)
    table.caption_justify = "left"
    return table
