"""Crash safety: a run SIGKILLed at a random step and resumed ends exactly like an uninterrupted
one — same accountant history, same ε, same losses, no duplicated or missing metric steps."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


# seeded: a resumed run is compared bit for bit with an uninterrupted one (the default secure mode
# draws fresh noise after a resume; tests/test_privacy_noise.py)
ARGS = ["debug=tiny", "train.steps=14", "train.eval_every=4", "runtime.checkpoint_every=2", "runtime.progress=none",
        "privacy.noise=seeded"]


def _dpft(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dpft.cli import main; main()", *args]


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return 0


@pytest.mark.parametrize("flag", ["--resume", None], ids=["explicit", "plain-rerun"])
def test_sigkill_then_resume_matches_uninterrupted(read_run, run_dirs, tmp_path, dpft, flag):
    """`--resume`, and since resuming is the default, the plain command run again (issue 22: it
    used to archive the checkpoint and restart at step 1 without a word)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_dpft("train", *ARGS, f"paths.output_dir={ref_out}"), check=True, env=env, capture_output=True)

    kill_at = random.Random().randint(4, 11)
    proc = subprocess.Popen(_dpft("train", *ARGS, f"paths.output_dir={out}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        runs = run_dirs(out)
        if runs and _last_step(runs[0]) >= kill_at and (runs[0] / "checkpoint.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    (run,) = run_dirs(out)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for the poll)")
    assert json.loads((run / "meta.json").read_text())["status"] == "running"  # killed: no chance to record

    r = dpft("train", *ARGS, f"paths.output_dir={out}", *([flag] if flag else []))
    assert r.exit_code == 0, r.stderr
    assert "resuming" in r.stdout and not (run / "attempts").exists(), r.stdout
    metrics, summary, meta = read_run(run)
    ref_metrics, ref_summary, _ = read_run(run_dirs(ref_out)[0])
    assert [m["step"] for m in metrics] == list(range(1, 15))  # nothing duplicated, nothing missing
    assert summary["privacy"]["history"] == ref_summary["privacy"]["history"]
    assert summary["privacy"]["epsilon"] == pytest.approx(ref_summary["privacy"]["epsilon"], rel=1e-12)
    assert [m["train/loss"] for m in metrics] == pytest.approx([m["train/loss"] for m in ref_metrics], rel=1e-5)
    assert summary["final"] == pytest.approx(ref_summary["final"])
    assert meta["status"] == "done" and meta["resumed"] and summary["resumed_from_step"] >= 2
    assert not (run / "checkpoint.pt").exists()


def test_sigterm_checkpoints_at_step_boundary_and_resumes(read_run, run_dirs, tmp_path, dpft):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = tmp_path / "term"
    args = [*(a for a in ARGS if not a.startswith("runtime.checkpoint_every=")), "runtime.checkpoint_every=null"]
    proc = subprocess.Popen(_dpft("train", *args, f"paths.output_dir={out}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        runs = run_dirs(out)
        if runs and _last_step(runs[0]) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    proc.wait()
    (run,) = run_dirs(out)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert json.loads((run / "meta.json").read_text())["status"] == "interrupted"
    assert (run / "checkpoint.pt").exists()  # taken on the signal, not by the (disabled) schedule
    r = dpft("train", *args, f"paths.output_dir={out}", "--resume")
    assert r.exit_code == 0, r.stderr
    metrics, summary, _ = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 15))


@pytest.mark.parametrize("damage", ["corrupt", "foreign"])
def test_bad_checkpoint_is_refused_whole(run_dirs, tmp_path, dpft, damage):
    import torch

    out = tmp_path / "o"
    assert dpft("train", *ARGS, "train.steps=3", f"paths.output_dir={out}").exit_code == 0
    (run,) = run_dirs(out)
    meta = json.loads((run / "meta.json").read_text())
    meta["status"] = "interrupted"
    (run / "meta.json").write_text(json.dumps(meta))
    if damage == "corrupt":
        (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
        expected = "corrupt or unreadable"
    else:
        torch.save({"format": 1, "dpft_version": "0.1.0", "run_id": "someoneelse"}, run / "checkpoint.pt")
        expected = "belongs to run someoneelse"
    before = (run / "metrics.jsonl").read_bytes()
    r = dpft("train", *ARGS, "train.steps=3", f"paths.output_dir={out}", "--resume")
    assert r.exit_code == 2 and expected in r.stderr
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing touched
