"""Data parallel through torchrun (gloo, 2 CPU processes): same ε, same per-step batch, loss and
alignment curve as one process with the same logical batch (dropout off, so the two computations
are the same up to float summation order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpft.store import read_metrics

NO_DROPOUT = ["+model.arch.hidden_dropout_prob=0", "+model.arch.attention_probs_dropout_prob=0"]
# seeded: one process and two must draw the same noise and batches to be compared step by step
ARGS = ["debug=tiny", "logger=none", "runtime.progress=none", "train.steps=4", "train.eval_every=2",
        "privacy.noise=seeded", *NO_DROPOUT]


def _run_dir(root):
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_torchrun_two_processes_match_one_process(dpft, tmp_path):
    single = tmp_path / "single"
    r = dpft("train", *ARGS, output_dir=single)
    assert r.exit_code == 0, r.stderr

    multi = tmp_path / "multi"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dpft.cli", "train", *ARGS, "launcher=torchrun", "nproc=2",
                           f"paths.output_dir={multi}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    a, b = _run_dir(single), _run_dir(multi)
    assert a.name == b.name  # the launcher changes how, not what: same run id
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        assert x["train/batch_size"] == y["train/batch_size"]  # the whole logical batch, not a shard
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-5)
        assert y["train/cos_noised"] == pytest.approx(x["train/cos_noised"], rel=1e-3, abs=1e-5)
        assert y["train/clipped_frac"] == pytest.approx(x["train/clipped_frac"])
        if "eval/accuracy" in x:
            assert y["eval/accuracy"] == x["eval/accuracy"]
            assert y["privacy/epsilon"] == x["privacy/epsilon"]
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sb["world_size"] == 2 and "world_size" not in sa
    for key in ("epsilon", "sigma", "sample_rate", "steps", "clip_norm", "accountant"):
        assert sb["privacy"][key] == sa["privacy"][key], key
    assert json.loads((b / "meta.json").read_text())["status"] == "done"
    # rank 0 alone wrote the run: one metrics record per step, no second summary
    assert len(mb) == 4


@pytest.mark.parametrize("override, message", [
    ("nproc=0", "nproc must be an integer"),
    ("launcher=slurm", "launcher must be local or torchrun"),
])
def test_bad_launcher_settings_are_one_line_errors(dpft, override, message):
    r = dpft("train", "debug=tiny", override)
    assert r.exit_code != 0
    assert message in r.stderr and "Traceback" not in r.stderr
