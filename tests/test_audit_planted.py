"""`dpft audit --canary gradient` catches deliberately broken engines, and passes correct ones.

Each bug is planted from here, by monkeypatching a public seam of the engine (the noise drawer
`dpft.engine.noise.StepNoise.gaussians`, the clip rule `Method.clip_factors`, the key derivation
`NoiseSource.create`); production code has no switch for it. The ledger keeps claiming the
original (ε, δ), so the audit must exit 1.

False alarms on correct engines. An audit exits 1 when (a) the one-run ε lower bound exceeds the
claim, or (b) one of the two white-box mechanism checks fails. (a) happens with probability at most
1 − confidence = 5 % per run for a mechanism that is exactly (ε, δ)-DP (Steinke et al.'s theorem;
the Bonferroni split over the guess counts keeps it at 5 % whichever count is reported), and far
less here: the accountant's RDP ε over-states the Gaussian mechanism's true ε, and an ideal auditor of
the exact mechanism reaches only ≈ 0.2–0.3 of the claim at these sizes (docs/audit.md), so the bound
sits far below the claim — the tests below see 0.1–0.6 against 2. (b) runs each check at
significance 1e-6 (Bonferroni over tensors for the noise floor: an exact χ² argument; the canary
signal check is a normal approximation over the ≈ 450 included canaries sampled at some steps and
not at others, with the cross-talk of the real examples cancelled within each canary). So over the
correct-engine runs here the family-wise false-alarm probability is bounded by runs × (5 % + 2e-6)
in the worst case and is negligible in practice; the planted bugs are caught at p-values below
1e-10 or with bounds well above the claim, so the detections are not marginal either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dpft.engine import noise
from dpft.methods import base

# m = 1000 canaries, 10 steps of the audit preset (q ≈ 0.2, claim ε = 2): ~15 s of CPU per audit
ARGS = ("audit", "--canary", "gradient", "train.steps=10")


def _audit(dpft, out: Path, *extra: str, m: int = 1000) -> tuple[object, dict]:
    r = dpft(*ARGS, "--canaries", str(m), *extra, f"paths.output_dir={out}")
    found = sorted((out / "audits").glob("*/audit.json"))
    res = json.loads(found[0].read_text()) if found else None
    return r, res


def _caught(r, res) -> None:
    assert r.exit_code == 1, (r.stdout, r.stderr, r.exception)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert res["violation"] is True


def test_sigma_halved_is_caught(dpft, tmp_path, monkeypatch):
    """The noise drawer draws σC/2 while the method and the ledger say σC: the release carries a
    quarter of the claimed noise power, which the noise-floor check sees in every tensor."""
    draw = noise.StepNoise.gaussians
    monkeypatch.setattr(noise.StepNoise, "gaussians",
                        lambda self, specs, device: draw(self, [(shape, std / 2) for shape, std in specs], device))
    r, res = _audit(dpft, tmp_path / "store")
    _caught(r, res)
    nf = res["mechanism_checks"]["noise_floor"]
    assert nf["failed"] and nf["ratio"] < 0.3 and nf["p_value"] < 1e-10


def test_reported_noise_halved_is_caught(dpft, tmp_path, monkeypatch):
    """The method's noise_std (what it draws and what it reports to post-processing) is halved
    while the accountant composes σ: the noise floor agrees with the method, but the canaries
    stand out twice as far as the ledger's σ allows (ratio ≈ 2 where 1 is the most a correct
    engine shows)."""
    std = base.Method.noise_std
    monkeypatch.setattr(base.Method, "noise_std", lambda self: {k: v / 2 for k, v in std(self).items()})
    # 3000 canaries: the signal check's standard error is ≈ 0.06 of the bound, the excess 1.0
    r, res = _audit(dpft, tmp_path / "store", m=3000)
    _caught(r, res)
    cs = res["mechanism_checks"]["canary_signal"]
    assert cs["failed"] and cs["ratio"] > 1.5


def test_unnoised_tensor_is_caught(dpft, tmp_path, monkeypatch):
    """One trainable tensor (the 6th privatised, layer 0's query weight, 1024 entries) is released
    without noise. Its release is the clipped sum alone, far below the claimed noise power."""
    draw = noise.StepNoise.gaussians

    def gaussians(self, specs, device):
        return draw(self, [(shape, 0.0 if k == 5 else std) for k, (shape, std) in enumerate(specs)], device)

    monkeypatch.setattr(noise.StepNoise, "gaussians", gaussians)
    r, res = _audit(dpft, tmp_path / "store")
    _caught(r, res)
    nf = res["mechanism_checks"]["noise_floor"]
    assert nf["failed"] and nf["tensor"] == "bert.encoder.layer.0.attention.self.query.weight"
    assert nf["ratio"] < 0.3  # ≈ 0.1: its clipped sum alone, against the claimed noise


def test_clip_four_times_c_is_caught(dpft, tmp_path, monkeypatch):
    """Per-sample clipping at 4·C while the noise (σC) and the ledger say C: each canary's
    contribution is 4× what the sensitivity allows, and so is its signal in the release."""
    monkeypatch.setattr(base.Method, "clip_factors",
                        lambda self, sq: base.clip_flat(sq.sum(0).sqrt(), 4 * self.privacy.clip_norm))
    r, res = _audit(dpft, tmp_path / "store")
    _caught(r, res)
    cs = res["mechanism_checks"]["canary_signal"]
    assert cs["failed"] and cs["ratio"] > 3


def test_noise_keyed_by_the_public_seed_is_caught(dpft, tmp_path, monkeypatch):
    """The mechanism's key is derived from the public seed and run id (as privacy.noise=seeded
    does) while the ledger says secure. The auditor rebuilds that key from the config, regenerates
    every step's noise, subtracts it and reads the clipped sums: the canaries are seen exactly."""

    def create(cls, mode, seed, run_id, dist=None):
        return cls(mode, hashlib.sha256(f"dpft-seeded\0{int(seed)}\0{run_id}".encode()).digest())

    monkeypatch.setattr(noise.NoiseSource, "create", classmethod(create))
    r, res = _audit(dpft, tmp_path / "store")
    _caught(r, res)
    assert res["noise_regenerated_steps"] == res["steps"]
    assert res["exceeds_claim"] and res["epsilon_lower_bound"] > 1.5 * res["claimed_epsilon"]


def test_correct_engine_is_not_flagged_and_seeded_simulation_is_not_attacked(dpft, tmp_path):
    """The honest engine with privacy.noise=seeded (a declared simulation): the auditor does not
    use the public key against a ledger that says ε is no guarantee against the config's readers."""
    r, res = _audit(dpft, tmp_path / "store", "privacy.noise=seeded")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert res["noise_guess"] is None and res["noise_regenerated_steps"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_engine_never_exits_1(dpft, tmp_path, seed):
    """Correct DP-SGD, three seeds (each: fresh coins, canaries and secure noise)."""
    r, res = _audit(dpft, tmp_path / "store", f"seed={seed}")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert not res["violation"] and not res["mechanism_checks"]["failed"]
    assert res["noise_regenerated_steps"] == 0
    assert res["epsilon_lower_bound"] < res["claimed_epsilon"]
