"""The real CLI end to end on tiny settings; assertions read what the run wrote."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


TINY = ["debug=tiny"]


def _mean(xs):
    return sum(xs) / len(xs)


def test_nonprivate_loss_falls(read_run, run_dirs, dpft):
    r = dpft("train", *TINY, "method=nonprivate", "train.steps=60", "optim.lr=3e-3", "train.lr_schedule=constant",
             "train.eval_every=30")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, meta = read_run(run)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 60
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.05  # from chance (ln 2 ≈ 0.693)
    assert meta["status"] == "done"
    assert summary["privacy"] == {"private": False, "epsilon": "inf", "sampling": "shuffle",
                                  "guarantee": "none: non-private training"}
    assert [m["step"] for m in metrics] == list(range(1, 61))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_dpsgd_spends_the_target_epsilon(read_run, run_dirs, dpft, mode):
    r = dpft("train", *TINY, f"engine.grad_sample_mode={mode}", "privacy.epsilon=3", "privacy.delta=1e-3")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, meta = read_run(run)
    led = summary["privacy"]
    assert 0.95 * 3 <= led["epsilon"] <= 3.0
    eps_curve = [m["privacy/epsilon"] for m in metrics if "privacy/epsilon" in m]
    assert eps_curve == sorted(eps_curve) and eps_curve[-1] == pytest.approx(led["epsilon"])
    assert all(e <= 3.0 for e in eps_curve)
    assert led["steps"] == 6 and led["sampling"] == "poisson" and led["accountant"] == "rdp"
    assert led["sample_rate"] == pytest.approx(32 / 400) and led["delta"] == 1e-3
    assert led["epsilon_independent"] == pytest.approx(led["epsilon"], rel=0.01)
    assert led["accountants_disagree"] is False
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        for key in ("train/loss", "privacy/sigma", "privacy/clip_norm", "privacy/sample_rate",
                    "train/clipped_frac", "train/cos_noised", "train/cos_final"):
            assert key in m, key
    assert -1 <= evals[-1]["train/cos_noised"] <= 1
    assert summary["final"] == evals[-1]["eval/accuracy"] and summary["steps"] == 6
    for key in ("best", "steps_to_90", "steps_to_95", "wall_time_s", "epsilon"):
        assert key in summary
    assert meta["status"] == "done" and meta["versions"]["opacus"]


def test_rerun_of_finished_config_is_skipped_unless_forced(run_dirs, dpft):
    assert dpft("train", *TINY, "train.steps=2").exit_code == 0
    r = dpft("train", *TINY, "train.steps=2", "logger=none")  # logger is not part of the id
    assert r.exit_code == 0 and "already done" in r.stdout
    r = dpft("train", *TINY, "train.steps=2", "--force")
    assert r.exit_code == 0 and "already done" not in r.stdout
    (run,) = run_dirs(dpft.output_dir)
    assert (run / "attempts" / "1" / "summary.json").is_file()  # the forced re-run archived, not lost


def test_show_prints_resolved_config(dpft):
    r = dpft("show", "method=nonprivate", "privacy.epsilon=3")
    assert r.exit_code == 0
    assert "run id:" in r.stdout and "name: nonprivate" in r.stdout and "epsilon: 3" in r.stdout


def test_steps_to_target_counts_first_eval_reaching_it(read_run, run_dirs, dpft):
    r = dpft("train", *TINY, "method=nonprivate", "train.steps=4", "train.eval_every=1", "task.target=0.01")
    assert r.exit_code == 0, r.stderr
    _, summary, _ = read_run(run_dirs(dpft.output_dir)[0])
    assert summary["steps_to_90"] == 1 and summary["steps_to_95"] == 1


def test_ctrl_c_marks_run_interrupted(run_dirs, dpft, monkeypatch):
    from dpft.engine.stepper import Stepper

    calls = {"n": 0}
    real = Stepper.step

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Stepper, "step", flaky)
    r = dpft("train", *TINY)
    assert r.exit_code == 130
    (run,) = run_dirs(dpft.output_dir)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "interrupted" and not (run / "summary.json").exists()


def test_wandb_offline_run_lands_in_run_dir(run_dirs, dpft, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    r = dpft("train", *TINY, "train.steps=2", "logger=auto")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["wandb_run_id"]
    assert list((run / "wandb").glob("offline-run-*")), "auto mode without credentials must be offline"


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, dpft.cli; heavy = [m for m in ('torch', 'wandb', 'pandas', 'matplotlib', 'transformers')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lora_trains_adapters_and_they_move(read_run, run_dirs, dpft):
    r = dpft("train", *TINY, "model.peft=lora", "train.steps=2")
    assert r.exit_code == 0, r.stderr
    metrics, summary, _ = read_run(run_dirs(dpft.output_dir)[0])
    assert metrics[0]["train/moved_frac"] == 1.0  # every trainable (adapter/head) tensor moved
    assert summary["privacy"]["epsilon"] <= 8.0


def test_update_that_moves_nothing_is_refused(run_dirs, dpft, monkeypatch):
    import torch

    # the update never reaches the weights (what Opacus #820 did to LoRA silently)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    r = dpft("train", *TINY, "train.steps=2")
    assert r.exit_code == 2 and "changed no trainable weight" in r.stderr
    meta = json.loads((run_dirs(dpft.output_dir)[0] / "meta.json").read_text())
    assert meta["status"] == "failed"


def test_wandb_key_never_lands_in_the_run_dir(run_dirs, dpft, monkeypatch):
    secret = "dpft-test-secret-0123456789abcdef0123456789abcdef01"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")  # credentials present, still no server contact
    r = dpft("train", *TINY, "train.steps=2", "logger=auto")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
