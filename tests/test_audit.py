"""`dpft audit`: the one-run canary audit (Steinke, Nasr & Jagielski 2023).

The statistics are checked against scipy's Clopper–Pearson interval and against a simulated
mechanism whose true ε is known; end to end, every DP method's empirical ε must stay below its
claimed ε while the audit can prove more than the claim, and a deliberately broken mechanism
(noise switched off, still accounted as σ; planted from the test) must be caught with a large empirical ε.
Gradient canaries (`--canary gradient`): every method, both scores, the refusals; the planted-bug
suite is tests/test_audit_planted.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpft import audit as au


def _audit_json(output_dir: Path) -> tuple[Path, dict]:
    found = sorted((Path(output_dir) / "audits").glob("*/audit.json"))
    assert len(found) == 1, found
    return found[0].parent, json.loads(found[0].read_text())


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("r,v", [(50, 40), (200, 150), (500, 480), (100, 100), (30, 16)])
def test_pure_dp_bound_is_the_clopper_pearson_lower_bound(r, v):
    """δ = 0: Binomial domination makes the one-run bound logit(one-sided CP lower bound)."""
    from scipy.stats import binomtest

    significance = 0.05
    low = binomtest(v, r).proportion_ci(confidence_level=1 - 2 * significance, method="exact").low
    expected = max(0.0, math.log(low / (1 - low)))
    assert au.epsilon_lower_bound(1000, r, v, 0.0, significance) == pytest.approx(expected, abs=1e-5)


def test_bound_is_monotone_and_delta_only_weakens_it():
    m, r = 500, 200
    bounds = [au.epsilon_lower_bound(m, r, v, 1e-5, 0.05) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0 and all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:])) and bounds[-1] > 2
    for v in (150, 190, 200):
        pure = au.epsilon_lower_bound(m, r, v, 0.0, 0.05)
        assert au.epsilon_lower_bound(m, r, v, 1e-5, 0.05) <= pure
        assert au.epsilon_lower_bound(m, r, v, 1e-3, 0.05) < au.epsilon_lower_bound(m, r, v, 1e-5, 0.05)


def test_bound_holds_and_has_power_on_a_mechanism_of_known_epsilon():
    """Randomised response on each canary's membership is exactly ε-DP per canary: the 95% bound
    must stay below ε in (about) 95% of trials, and not be vacuous."""
    eps, m, trials = 2.0, 1000, 60
    rng = np.random.default_rng(7)
    p = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < p
        released = np.where(truthful, included, ~included)
        scores = released + 1e-3 * rng.random(m)  # ties broken by public randomness
        bounds.append(au.membership_test(scores, included, 0.0, 0.95)["epsilon_lower_bound"])
    bounds = np.array(bounds)
    assert (bounds > eps).mean() <= 0.1, bounds  # ≤ 5% expected; Bonferroni makes it rarer still
    assert np.median(bounds) > 0.7 * eps, bounds


def test_membership_test_counts_guesses():
    scores = np.arange(100, dtype=float)
    included = scores >= 50  # a perfect score
    out = au.membership_test(scores, included, 0.0, 0.95)
    assert out["precision"] == 1.0 and out["correct"] == out["guesses"] == 100
    assert out["epsilon_lower_bound"] == pytest.approx(out["epsilon_max_provable"])
    flipped = au.membership_test(-scores, included, 0.0, 0.95)
    assert flipped["epsilon_lower_bound"] == 0.0


# --------------------------------------------------------------------------- end to end

# Every DP method in dpft/methods/. ANADP needs per-group clip factors, i.e. hooks mode, whose
# per-sample embedding gradients make a step ~5× dearer on CPU: fewer steps (σ is recalibrated for
# them, the claim stays ε = 2) and a short warm-up so its adaptive noise allocation is exercised.
METHODS = {
    "dpsgd": [],
    "psasc": [],
    "psac": [],
    "anadp": ["engine.grad_sample_mode=hooks", "train.steps=8", "method.warmup=2"],
    "denoise": [],
    "grape": [],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_empirical_epsilon_stays_below_the_claim(dpft, tmp_path, method):
    out = tmp_path / "store"
    r = dpft("audit", f"method={method}", *METHODS[method], f"paths.output_dir={out}")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    path, res = _audit_json(out)
    summary = json.loads((path / "summary.json").read_text())
    ledger = summary["privacy"]
    assert res["method"] == summary["method"] == method
    assert res["claimed_epsilon"] == pytest.approx(ledger["epsilon"]) and res["delta"] == ledger["delta"]
    # the audit could refute the claim (so "below" means something) ...
    assert res["refutable"] and res["epsilon_max_provable"] > res["claimed_epsilon"]
    # ... and does not
    assert res["epsilon_lower_bound"] < res["claimed_epsilon"]
    assert res["violation"] is False and res["canary"] == "input"
    # public parameters: N counts every candidate canary, whichever coins came up
    assert ledger["dataset_size"] == 250 + res["canaries"]
    assert ledger["sample_rate"] == pytest.approx(256 / ledger["dataset_size"])
    lines = [json.loads(x) for x in (path / "canaries.jsonl").read_text().splitlines()]
    assert len(lines) == res["canaries"] and sum(x["included"] for x in lines) == res["included"]
    assert "empirical ε" in r.stdout


def test_broken_mechanism_is_caught(dpft, tmp_path, monkeypatch):
    """Noise switched off in the drawer (planted from here: dpft/engine/noise.py's StepNoise) but
    still accounted as σ: a large empirical ε, exit 1, one error line."""
    from dpft.engine import noise

    monkeypatch.setattr(noise.StepNoise, "gaussians",
                        lambda self, specs, device: [torch.zeros(tuple(shape), device=device) for shape, _ in specs])
    out = tmp_path / "store"
    r = dpft("audit", f"paths.output_dir={out}")
    assert r.exit_code == 1, (r.stdout, r.stderr, r.exception)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "exceeds the claimed" in errors[0] and "Traceback" not in r.stderr
    _, res = _audit_json(out)
    assert res["violation"] is True and res["exceeds_claim"] is True and res["mechanism_checks"] is None
    assert res["auc"] > 0.95
    assert res["epsilon_lower_bound"] > 1.5 * res["claimed_epsilon"]


def test_no_test_only_switch_in_the_audit():
    assert not hasattr(au, "UNSAFE_BREAK") and not hasattr(au, "_break_mechanism")


def test_audit_is_stored_once_and_force_keeps_the_previous(dpft, tmp_path):
    out = tmp_path / "store"
    # seeded noise: the --force rerun must reproduce the first audit's bound (fresh secure noise would
    # give a different, usually but not always zero, bound on each run)
    args = ("audit", "--canaries", "40", "train.steps=2", "privacy.noise=seeded", f"paths.output_dir={out}")
    assert dpft(*args).exit_code == 0
    path, first = _audit_json(out)
    # input canaries keep the ids audits had before --canary existed (the retired switch stays hashed as null)
    import hashlib

    blob = json.dumps({"run_id": first["run_id"], "canaries": 40, "canary_length": 8, "confidence": 0.95,
                       "score": "embedding", "unsafe_break": None}, sort_keys=True)
    assert path.name == hashlib.sha256(blob.encode()).hexdigest()[:12]
    again = dpft(*args)
    assert again.exit_code == 0 and "already audited" in again.stdout
    assert json.loads((path / "audit.json").read_text()) == first
    assert dpft(*args, "--force").exit_code == 0
    kept = json.loads((path / "attempts" / "1" / "audit.json").read_text())
    assert kept == first
    assert json.loads((path / "audit.json").read_text())["epsilon_lower_bound"] == first["epsilon_lower_bound"]
    # a dpft train run of the same config is a different store entry
    assert not (out / "runs").exists()


# --------------------------------------------------------------------------- gradient canaries


@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_canaries_every_method(dpft, tmp_path, method):
    """White-box gradient canaries through each method's own clip, noise and post-processing: the
    bound stays below the claim, both mechanism checks pass, and the public N counts every candidate."""
    out = tmp_path / "store"
    m = 300
    r = dpft("audit", "--canary", "gradient", "--canaries", str(m), f"method={method}", *METHODS[method],
             f"paths.output_dir={out}")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    path, res = _audit_json(out)
    ledger = json.loads((path / "summary.json").read_text())["privacy"]
    assert res["canary"] == "gradient" and res["score"] == "iterates" and res["method"] == method
    assert res["claimed_epsilon"] == pytest.approx(ledger["epsilon"])
    assert ledger["dataset_size"] == 250 + m and ledger["noise"] == "secure"
    assert res["refutable"] and res["epsilon_lower_bound"] < res["claimed_epsilon"] and not res["violation"]
    checks = res["mechanism_checks"]
    assert not checks["failed"] and checks["noise_floor"]["tensors"] == 41  # every tiny-bert tensor trains
    assert res["noise_regenerated_steps"] == 0 and res["disjoint"]
    # the canaries were really in the run: included ones sampled ~q·T times, excluded ones never
    rows = [json.loads(x) for x in (path / "canaries.jsonl").read_text().splitlines()]
    assert len(rows) == m and sum(x["included"] for x in rows) == res["included"]
    assert all(x["times_sampled"] == 0 for x in rows if not x["included"])
    mean_in = np.mean([x["times_sampled"] for x in rows if x["included"]])
    assert mean_in == pytest.approx(ledger["sample_rate"] * res["steps"], rel=0.25)
    if method == "grape":  # canaries live in the projected space of the projected layers
        assert res["projected_tensors"] and res["privatised_dim"] < _model_dim(path)
    else:
        assert not res["projected_tensors"] and res["privatised_dim"] == _model_dim(path)


def _model_dim(path: Path) -> int:
    from dpft.config import compose_run
    from dpft.engine.prepare import prepare

    spec = compose_run(["debug=audit", "train.batch_size=8"])
    return sum(p.numel() for p in prepare(spec).model.parameters() if p.requires_grad)


def test_gradient_canaries_last_iterate(dpft, tmp_path):
    """--score final reads θ_T − θ_0 only: no mechanism checks (they need every release); the noise
    switched off is still caught from the final model alone."""
    from dpft.engine import noise

    out = tmp_path / "store"
    args = ("audit", "--canary", "gradient", "--score", "final", "--canaries", "500", "train.steps=10")
    r = dpft(*args, f"paths.output_dir={out}")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    _, res = _audit_json(out)
    assert res["score"] == "final" and res["mechanism_checks"] is None and "last iterate" in res["threat_model"]
    assert res["epsilon_lower_bound"] < res["claimed_epsilon"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(noise.StepNoise, "gaussians",
                   lambda self, specs, device: [torch.zeros(tuple(shape), device=device) for shape, _ in specs])
        out2 = tmp_path / "broken"
        r = dpft(*args, f"paths.output_dir={out2}")
    assert r.exit_code == 1, (r.stdout, r.stderr, r.exception)
    _, res = _audit_json(out2)
    assert res["exceeds_claim"] and res["epsilon_lower_bound"] > res["claimed_epsilon"]


def test_gradient_canaries_bad_input(dpft, tmp_path):
    out = tmp_path / "store"
    for args, words in [(("--canary", "gradient", "method=nonprivate"), "claims no ε"),
                        (("--canary", "gradient", "--score", "embedding"), "must be one of iterates, final"),
                        (("--canary", "weights"), "must be one of input, gradient")]:
        r = dpft("audit", *args, f"paths.output_dir={out}")
        assert r.exit_code != 0 and r.exit_code != 1, (args, r.stdout, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (out / "audits").exists()


def test_injected_canaries_are_clipped_by_the_method(tmp_path):
    """The engine seam: each injected canary's clipped contribution has norm exactly C under flat
    clipping (its raw norm is 100·C), and ANADP-style per-tensor factors apply per tensor."""
    from dpft.engine.step import add_injected
    from dpft.methods import PrivacyParams
    from dpft.methods.base import Method

    params = {"a": torch.nn.Parameter(torch.zeros(40, 30)), "b": torch.nn.Parameter(torch.zeros(50))}
    privacy = PrivacyParams(sigma=1.0, clip_norm=0.5, sample_rate=1.0, expected_batch_size=10.0, steps=1, delta=1e-5)
    method = Method({})
    method.setup(None, params, privacy)
    cans = au.GradientCanaries(20, 0, "iterates")
    cans.included[:] = True
    cans.attach(method, params, privacy)
    assert cans.disjoint and cans.k == 60 + 2  # 1200 // 20 in a, 50 // 20 in b
    for i in range(3):
        clipped = {n: torch.zeros_like(p) for n, p in params.items()}
        rows = au._Rows(cans, torch.tensor([i]))
        add_injected(method, rows, clipped)
        total = torch.cat([clipped["a"].reshape(-1), clipped["b"]])
        assert float(total.norm()) == pytest.approx(0.5, rel=1e-5)
        flat = torch.zeros(cans.dim)
        flat[cans.coords[i]] = cans.unit[i]
        assert torch.allclose(total, 0.5 * flat, atol=1e-6)

    class PerTensor(Method):  # per-tensor clip C/√2 in each tensor (ANADP's shape of factors)
        def clip_factors(self, sq):
            return (self.privacy.clip_norm / 2 ** 0.5 / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)

    per = PerTensor({})
    per.setup(None, params, privacy)
    clipped = {n: torch.zeros_like(p) for n, p in params.items()}
    add_injected(per, au._Rows(cans, torch.tensor([0, 1])), clipped)
    assert float(clipped["a"].norm()) == pytest.approx(0.5, rel=1e-5)  # two canaries, 0.5/√2 each, orthogonal
    assert float(clipped["b"].norm()) == pytest.approx(0.5, rel=1e-5)
