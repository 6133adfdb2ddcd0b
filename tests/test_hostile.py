"""Hostile input matrix: bad configs and overrides, unknown flags, broken data files and sweep files,
run directories edited by hand, a full disk — across train, show, sweep, report, bench and audit.

Every case must end in exactly one `error: ...` line on stderr and exit 2 (no traceback), and leave
every file already in the store byte-identical (disk-full cases may add files, never temp files or
half-written ones). tests/test_bad_input.py, test_data.py, test_sweep.py and test_resume.py cover
other cases; none is repeated here.

How to read the table (``CASES``, one entry per case, keyed by "<command>: <what is wrong>")
-----------------------------------------------------------------------------------------
Every case starts from a copy ``{w}`` of one pristine working folder (fixture ``pristine``): a
sweep file ``{w}/hostile.yaml`` (two seeds of debug=tiny), its finished runs, plan and report in
the store ``{w}/store``, and one finished audit. ``Case(args, expected, setup, disk_full, writes)``:

- ``args``: the ``dpft`` command line. ``{w}`` and ``{store}`` are replaced by the two paths. The
  prefixes spell common commands: ``S`` = ``paths.output_dir={store}``; ``TRAIN`` a tiny run that
  is not in the store; ``FINISHED`` one that is (seed 0 of the sweep); ``SST2`` a run on
  ``task=sst2`` reading ``{w}/data``; ``REPORT`` the sweep's report; ``SWEEPF`` planning
  ``{w}/s.yaml`` (``--dry-run``).
- ``expected``: a substring of the single ``error: ...`` line the command must print.
- ``setup``: what to break in ``{w}`` before the command runs: ``write(rel, content)`` writes a
  file under ``{w}``; ``in_first_run(name, content)`` overwrites a file of the first finished run
  (``None``: replaces it with a directory); ``data_dir(train=, dev=, train_name=, dev_name=)``
  writes ``{w}/data`` (``None`` leaves that file out); ``both(a, b)`` does two; a lambda anything else.
- ``disk_full``: a file-name fragment; every fsync of a matching file fails with ENOSPC.
- ``writes``: the command may add files before it fails (disk full); existing ones must still be
  byte-identical or moved whole to ``attempts/<k>/``.

Adding a case is one line in ``CASES``; the test below runs it and checks all of the above."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

SWEEP = """# dpft sweep hostile.yaml
overrides: [debug=tiny, train.steps=2, runtime.progress=none]
grid:
  seed: 0,1
report:
  rows: [seed]
  cols: [method]
  measures: [final]
"""
TSV_OK = "sentence\tlabel\nfine film .\t1\nawful film .\t0\n"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A store with two finished runs of a sweep, its plan and report, and one audit."""
    from dpft.cli import app

    root = tmp_path_factory.mktemp("pristine")
    (root / "hostile.yaml").write_text(SWEEP)
    store = root / "store"
    runner = CliRunner()
    for args in (["sweep", str(root / "hostile.yaml"), "-e", "inline", f"paths.output_dir={store}"],
                 ["report", str(root / "hostile.yaml"), f"paths.output_dir={store}", "--no-plots"],
                 ["audit", "--canaries", "20", "train.steps=2", f"paths.output_dir={store}"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args, r.stdout, r.stderr, r.exception)
    return root


@pytest.fixture
def work(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def runs(w: Path) -> list[Path]:
    return sorted(p for p in (w / "store" / "runs").iterdir())


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def in_first_run(name: str, content: str | bytes | None) -> Callable[[Path], None]:
    """Edit a file of the first finished run by hand (None: replace it with a directory)."""
    def setup(w: Path) -> None:
        p = runs(w)[0] / name
        if content is None:
            p.unlink()
            p.mkdir()
        else:
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def data_dir(train: str | bytes | None = TSV_OK, dev: str | bytes | None = TSV_OK, train_name="train.tsv",
             dev_name="dev.tsv") -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        d = w / "data"
        d.mkdir()
        for name, content in ((train_name, train), (dev_name, dev)):
            if content is not None:
                (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def both(*setups):
    def setup(w: Path) -> None:
        for s in setups:
            s(w)
    return setup


@dataclass
class Case:
    args: list[str]
    expected: str
    setup: Callable[[Path], None] | None = None
    disk_full: str | None = None  # basename fragment whose fsync fails with ENOSPC
    writes: bool = False  # the command may add files before failing (disk full)


S = "paths.output_dir={store}"
TRAIN = ["train", "debug=tiny", "train.steps=3", "runtime.progress=none", S]  # not a run of the store
FINISHED = ["train", "debug=tiny", "train.steps=2", "runtime.progress=none", "seed=0", S]  # one that is
SST2 = ["train", "debug=tiny", "task=sst2", "task.data_dir={w}/data", "runtime.progress=none", S]
REPORT = ["report", "{w}/hostile.yaml", S, "--no-plots"]
SWEEPF = ["sweep", "{w}/s.yaml", "--dry-run", S]

CASES: dict[str, Case] = {
    # ---- configs and overrides (train / show)
    "show: + on an existing key": Case(["show", "+privacy.epsilon=3"], "Could not append to config"),
    "show: delete a required section": Case(["show", "~privacy"], "config is missing the 'privacy' section"),
    "show: dangling interpolation": Case(["show", "seed=${nope}"], "Interpolation key 'nope' not found"),
    "show: unknown flag": Case(["show", "--force"], "No such option: --force"),
    "train: seed not a number": Case([*TRAIN, "seed=abc"], "seed must be an integer"),
    "train: fractional seed": Case([*TRAIN, "seed=1.5"], "seed must be an integer"),
    "train: max_length 0": Case([*TRAIN, "task.max_length=0"], "task.max_length must be an integer >= 1"),
    "train: negative warm-up": Case([*TRAIN, "train.warmup_steps=-3"], "train.warmup_steps must be"),
    "train: eval_at not steps": Case([*TRAIN, "train.eval_at=[a]"], "train.eval_at must be a list of steps"),
    "train: checkpoint_every -1": Case([*TRAIN, "runtime.checkpoint_every=-1"], "runtime.checkpoint_every"),
    "train: unknown progress mode": Case([*TRAIN, "runtime.progress=fancy"], "runtime.progress must be"),
    "train: unknown dtype": Case([*TRAIN, "model.dtype=float8"], "model.dtype must be"),
    "train: heads do not divide hidden": Case([*TRAIN, "model.arch.hidden_size=33"], "model.arch: The hidden size"),
    "train: zero threads": Case([*TRAIN, "runtime.num_threads=0"], "runtime.num_threads must be"),
    "train: unknown device": Case([*TRAIN, "runtime.device=tpu"], "unknown device 'tpu'"),
    "train: unknown schedule": Case([*TRAIN, "train.lr_schedule=cosine"], "train.lr_schedule must be"),
    "train: unknown optimizer": Case([*TRAIN, "optim.name=lion"], "unknown optimizer 'lion'"),
    "train: runtime change to a finished run": Case([*FINISHED, "runtime.physical_batch_size=0"],
                                                    "runtime.physical_batch_size must be >= 1"),
    "train: empty synthetic task": Case([*TRAIN, "task.num_train=0"], "empty train or eval split"),
    "train: output dir is a file": Case(["train", "debug=tiny", "paths.output_dir={w}/afile"], "Not a directory",
                                        setup=write("afile", "x")),
    "cli: unknown command": Case(["retrain"], "No such command 'retrain'"),
    "report: missing sweep name": Case(["report"], "Missing argument"),
    # ---- data files (task=sst2 task.data_dir with GLUE TSV / JSON)
    "data: no label column": Case(SST2, "no column 'label'", data_dir(train="sentence\tgold\nok .\t1\n")),
    "data: no dev file": Case(SST2, "no eval file", data_dir(dev=None)),
    "data: header only": Case(SST2, "empty train or eval split", data_dir(train="sentence\tlabel\n")),
    "data: UTF-16 file": Case(SST2, "not UTF-8", data_dir(train=TSV_OK.encode("utf-16"))),
    "data: latin-1 dev file": Case(SST2, "not UTF-8", data_dir(dev="sentence\tlabel\ncaf\xe9 .\t1\n".encode("latin-1"))),
    "data: gzip named .tsv": Case(SST2, "not UTF-8", data_dir(train=gzip.compress(TSV_OK.encode()))),
    "data: short row": Case(SST2, "1 fields, header has 2", data_dir(train="sentence\tlabel\nno label here\n")),
    "data: empty label": Case(SST2, "label '' is not one of", data_dir(train="sentence\tlabel\nok .\t\n")),
    "data: json of strings": Case(SST2, "lacks", data_dir(train='["a", "b"]', dev=None, train_name="train.json")),
    "data: invalid json": Case(SST2, "not valid UTF-8 JSON", data_dir(train='{"0": {', train_name="train.json")),
    "data: json scalar": Case(SST2, "expected an object of examples", data_dir(train="3", train_name="train.json")),
    "data: data_dir is a file": Case([*SST2[:3], "task.data_dir={w}/afile", *SST2[4:]], "not a directory",
                                     setup=write("afile", TSV_OK)),
    # ---- sweep files
    "sweep: not UTF-8": Case(SWEEPF, "not UTF-8", write("s.yaml", b"overrides: [debug=tiny]\n# \xff\xfe\n")),
    "sweep: gzip bytes": Case(SWEEPF, "not UTF-8", write("s.yaml", gzip.compress(SWEEP.encode()))),
    "sweep: overrides not a list": Case(SWEEPF, "'overrides' must be a list", write("s.yaml", "overrides: debug=tiny\n")),
    "sweep: grid a list": Case(SWEEPF, "'grid' must map", write("s.yaml", "grid: [seed]\n")),
    "sweep: top level a list": Case(SWEEPF, "expected a mapping", write("s.yaml", "- debug=tiny\n")),
    "sweep: report a list": Case(SWEEPF, "'report' must be a mapping", write("s.yaml", "report: [rows]\n")),
    "sweep: two output dirs": Case(["sweep", "{w}/s.yaml", "--dry-run"], "one paths.output_dir",
                                   write("s.yaml", "overrides: [debug=tiny]\ngrid:\n  paths.output_dir: a,b\n")),
    "sweep: a flag among overrides": Case(SWEEPF, "malformed overrides '--force'",
                                          write("s.yaml", "overrides: [debug=tiny, --force]\n")),
    "sweep: grid value a mapping": Case(SWEEPF, "Hydra's sweep grammar", write("s.yaml", "grid:\n  seed: {a: 1}\n")),
    "sweep: a directory": Case(["sweep", "{w}/sd/", "--dry-run"], "not found", write("sd/x", "")),
    "sweep: --submitit without =": Case(["sweep", "{w}/hostile.yaml", "--submitit", "foo", S], "KEY=VALUE"),
    "sweep: unknown executor": Case(["sweep", "{w}/hostile.yaml", "-e", "pbs", S], "unknown executor 'pbs'"),
    "sweep: zero workers": Case(["sweep", "{w}/hostile.yaml", "-j", "0", S], "--workers must be >= 1"),
    # ---- bench / audit options
    "bench: unknown path mode": Case(["bench", "debug=tiny", "--paths", "dpsgd-magic"], "bench path 'dpsgd-magic'"),
    "bench: empty path list": Case(["bench", "debug=tiny", "--paths", ","], "--paths is empty"),
    "bench: unknown method": Case(["bench", "debug=tiny", "--paths", "nosuch-hooks", "--steps", "1"],
                                  "unknown method 'nosuch'"),
    "audit: too few canaries": Case(["audit", "--canaries", "5", S], "--canaries must be >= 10"),
    "audit: canaries not a number": Case(["audit", "--canaries", "many", S], "Invalid value for '--canaries'"),
    "audit: confidence above 1": Case(["audit", "--confidence", "1.5", S], "--confidence must be in (0, 1)"),
    "audit: unknown score": Case(["audit", "--score", "gradient", S], "--score for --canary input must be one of"),
    "audit: frozen embeddings": Case(["audit", "model.peft=lora", S], "needs trainable word embeddings"),
    "audit: generation task": Case(["audit", "task=e2e", "model=tiny-gpt2", S], "needs a classification task"),
    "audit: batch larger than data": Case(["audit", "train.batch_size=100000", S], "larger than the training set"),
    # ---- run directories edited by hand
    "report: plan not JSON": Case(REPORT, "not a plan line", write("store/sweeps/hostile/plan.jsonl", "{oops\n")),
    "report: plan line a list": Case(REPORT, "not a plan line", write("store/sweeps/hostile/plan.jsonl", "[1, 2]\n")),
    "report: plan not UTF-8": Case(REPORT, "not UTF-8", write("store/sweeps/hostile/plan.jsonl", b"\xff\xfe{}\n")),
    "report: metrics line a list": Case(REPORT, "metrics.jsonl:1: not a metrics record",
                                        in_first_run("metrics.jsonl", "[1, 2]\n")),
    "report: metrics line without step": Case(REPORT, "metrics.jsonl:2: not a metrics record",
                                              in_first_run("metrics.jsonl", '{"step": 1}\n{"eval/accuracy": 0.9}\n')),
    "report: metrics not UTF-8": Case(REPORT, "metrics.jsonl:1: not a metrics record",
                                      in_first_run("metrics.jsonl", b'\xff{"step": 1}\n{"step": 2}\n')),
    "report: metrics a directory": Case(REPORT, "Is a directory", in_first_run("metrics.jsonl", None)),
    "report: frozen sweep copy corrupt": Case(["report", "hostile", S, "--no-plots"], "invalid YAML",
                                              write("store/sweeps/hostile/sweep.yaml", "grid: {seed: 0,1")),
    "report: --out is a file": Case([*REPORT, "--out", "{w}/afile"], "File exists", write("afile", "x")),
    "train: runs/ is a file": Case(TRAIN, "Not a directory",
                                   lambda w: shutil.rmtree(w / "store" / "runs") or (w / "store" / "runs").write_text("x")),
    "report: a run dir replaced by a file": Case(REPORT, "Not a directory",
                                                 lambda w: [shutil.rmtree(r) or r.write_text("x") for r in runs(w)]),
    # ---- disk full (fsync of the named file fails with ENOSPC)
    "disk full: train config.yaml": Case([*TRAIN, "seed=7"], "No space left on device", disk_full="config.yaml",
                                         writes=True),
    "disk full: train metrics.jsonl": Case([*TRAIN, "seed=7"], "No space left on device", disk_full="metrics.jsonl",
                                           writes=True),
    "disk full: train summary.json": Case([*TRAIN, "seed=7"], "No space left on device", disk_full="summary.json",
                                          writes=True),
    "disk full: train --force keeps the finished run": Case([*FINISHED, "--force"], "No space left on device",
                                                            disk_full="config.yaml", writes=True),
    "disk full: sweep plan": Case(["sweep", "{w}/hostile.yaml", "--dry-run", S], "No space left on device",
                                  disk_full="plan.jsonl", writes=True),
    "disk full: report": Case(REPORT, "No space left on device", disk_full="hostile.tex", writes=True),
    "disk full: audit.json": Case(["audit", "--canaries", "20", "train.steps=2", "--force", S],
                                  "No space left on device", disk_full="audit.json", writes=True),
}


def _fill_disk(monkeypatch, fragment: str) -> None:
    """fsync of any file whose name contains `fragment` fails as on a full disk."""
    real = os.fsync

    def fsync(fd):
        if fragment in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_loses_nothing(dpft, work, monkeypatch, name):
    case = CASES[name]
    if case.setup is not None:
        case.setup(work)
    store = work / "store"
    before = snapshot(work)
    if case.disk_full:
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc to find which file an fsync is for")
        _fill_disk(monkeypatch, case.disk_full)
    args = [a.replace("{store}", str(store)).replace("{w}", str(work)) for a in case.args]
    r = dpft(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception  # not an uncaught exception
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert case.expected in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    after = snapshot(work)
    for k, digest in before.items():  # each file as it was, or moved aside whole by --force to attempts/<n>/
        archived = {after[a] for a in after if "/attempts/" in a and a.endswith("/" + k.rsplit("/", 1)[-1])}
        assert after.get(k) == digest or (case.writes and digest in archived), f"{k} lost or changed"
    if not case.writes:
        assert after == before, f"new files: {sorted(set(after) - set(before))}"
    assert not [k for k in after if k.endswith(".tmp")], "a temp file was left behind"


def test_disk_full_mid_run_marks_it_failed_and_keeps_complete_records(dpft, work, monkeypatch):
    """ENOSPC on the final summary: the run is 'failed' with the error in meta.json, its
    metrics.jsonl holds every step as a complete record, and no summary is half-written."""
    from dpft.store import read_metrics

    store = work / "store"
    _fill_disk(monkeypatch, "summary.json")
    r = dpft(*[a.replace("{store}", str(store)) for a in TRAIN])
    assert r.exit_code == 2 and "No space left on device" in r.stderr
    (new,) = [p for p in runs(work) if not (p / "summary.json").exists()]
    meta = json.loads((new / "meta.json").read_text())
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    assert [m["step"] for m in read_metrics(new / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.undo()
    again = dpft(*[a.replace("{store}", str(store)) for a in TRAIN])  # space again: re-run works
    assert again.exit_code == 0, again.stderr
    assert (new / "summary.json").is_file() and (new / "attempts" / "1" / "meta.json").is_file()


@pytest.mark.parametrize("damage", ["summary not JSON", "summary a list", "meta a list", "meta status edited"])
def test_hand_edited_finished_run_is_redone_and_the_old_attempt_kept(dpft, work, damage):
    """A finished run whose record no longer reads as finished is trained again; the damaged
    attempt is moved, byte-identical, to attempts/1 — never overwritten."""
    store = work / "store"
    target = runs(work)[0]
    name, content = {"summary not JSON": ("summary.json", "{"), "summary a list": ("summary.json", "[]"),
                     "meta a list": ("meta.json", "[]"),
                     "meta status edited": ("meta.json", '{"status": "exploded"}')}[damage]
    (target / name).write_text(content)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    plan = [json.loads(x) for x in (store / "sweeps" / "hostile" / "plan.jsonl").read_text().splitlines()]
    job = next(j for j in plan if j["run_id"] == target.name)
    overrides = [o for o in job["overrides"] if not o.startswith("paths.output_dir=")]
    r = dpft("train", *overrides, f"paths.output_dir={store}")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    kept = target / "attempts" / "1"
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == before
    assert json.loads((target / "meta.json").read_text())["status"] == "done"
