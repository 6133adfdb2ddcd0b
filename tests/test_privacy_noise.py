"""The mechanism's randomness and what a run publishes (README "Privacy contract").

Threat model under test: the adversary reads config.yaml, meta.json, metrics.jsonl, summary.json,
W&B and the released model. By default (privacy.noise=secure) the noise and the Poisson batches
must not be reproducible from any of that; privacy.noise=seeded is a bit-reproducible simulation
that says so; a resume never re-releases steps on other data nor undercounts released steps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch


TINY = ["debug=tiny", "train.steps=4", "train.eval_every=2", "runtime.progress=none", "runtime.checkpoint_every=null"]


def _train_in_process(tmp_path: Path, *overrides: str):
    """Train through the engine's own entry points; returns (metrics, summary, final weights)."""
    from dpft.config import compose_run
    from dpft.engine import train as engine
    from dpft.engine.prepare import prepare
    from dpft.store import RunDir

    spec = compose_run([*TINY, f"paths.output_dir={tmp_path}", *overrides])
    prep = prepare(spec)
    run = RunDir(tmp_path / spec.run_id)
    run.path.mkdir(parents=True, exist_ok=True)
    sink = run.metrics_sink()
    try:
        summary = engine.run(prep, run, sink)
    finally:
        sink.close()
    weights = {n: p.detach().clone() for n, p in prep.model.named_parameters() if p.requires_grad}
    return run.metrics(), summary, weights


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


# -- black-box: the default mode is not a function of the config; seeded mode is ------------------

def test_default_mode_runs_of_one_config_draw_different_noise(tmp_path):
    m1, s1, w1 = _train_in_process(tmp_path / "a")
    m2, s2, w2 = _train_in_process(tmp_path / "b")
    assert s1["run_id"] == s2["run_id"]  # the same public config
    cos1, cos2 = [r["train/cos_noised"] for r in m1], [r["train/cos_noised"] for r in m2]
    assert cos1 != cos2
    assert not _same_weights(w1, w2)
    assert s1["privacy"]["noise"] == "secure" and s1["privacy"]["simulation"] is False
    # the pre-fix attack: noise regenerated from the public seed (seed + 2) is not what was added
    assert s1["privacy"]["epsilon"] == pytest.approx(s2["privacy"]["epsilon"])  # same public ledger


def test_seeded_mode_is_bit_identical_and_says_it_is_a_simulation(tmp_path):
    m1, s1, w1 = _train_in_process(tmp_path / "a", "privacy.noise=seeded")
    m2, s2, w2 = _train_in_process(tmp_path / "b", "privacy.noise=seeded")
    strip = lambda ms: [{k: v for k, v in r.items() if k != "train/step_time"} for r in ms]  # noqa: E731
    assert strip(m1) == strip(m2)
    assert _same_weights(w1, w2)
    priv = s1["privacy"]
    assert priv["noise"] == "seeded" and priv["simulation"] is True
    assert "NOT a guarantee" in priv["guarantee"]


def test_seeded_draws_differ_between_configs_and_from_the_public_seed():
    from dpft.engine.noise import NoiseSource

    a = NoiseSource.create("seeded", 0, "run-a").for_step(1).gaussian((1000,), 1.0, "cpu")
    a2 = NoiseSource.create("seeded", 0, "run-a").for_step(1).gaussian((1000,), 1.0, "cpu")
    b = NoiseSource.create("seeded", 0, "run-b").for_step(1).gaussian((1000,), 1.0, "cpu")
    step2 = NoiseSource.create("seeded", 0, "run-a").for_step(2).gaussian((1000,), 1.0, "cpu")
    assert torch.equal(a, a2)
    # two runs that differ only in ε have different run ids: their noise must not cancel
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.2
    assert abs(float(torch.corrcoef(torch.stack([a, step2]))[0, 1])) < 0.2
    for s in range(4):  # nor is it the pre-fix stream torch.Generator().manual_seed(seed + k)
        old = torch.normal(0.0, 1.0, size=(1000,), generator=torch.Generator().manual_seed(s))
        assert abs(float(torch.corrcoef(torch.stack([a, old]))[0, 1])) < 0.2


def test_two_configs_differing_only_in_epsilon_do_not_share_noise(tmp_path):
    """The cancellation attack: (θ_ε3 − θ_ε8) must not be noise-free up to a scale."""
    from dpft.config import compose_run
    from dpft.engine.noise import NoiseSource

    ids = [compose_run([*TINY, f"privacy.epsilon={e}", "privacy.noise=seeded"]).run_id for e in (3, 8)]
    assert ids[0] != ids[1]
    z = [NoiseSource.create("seeded", 0, i).for_step(1).gaussian((4000,), 1.0, "cpu") for i in ids]
    assert abs(float(torch.corrcoef(torch.stack(z))[0, 1])) < 0.1


def test_the_noise_key_is_never_written(tmp_path, monkeypatch):
    """Pin the OS key, train with checkpoints, and look for the key and every per-step seed derived
    from it in every file the run wrote (config, meta, metrics, summary, checkpoint)."""
    import secrets

    from dpft.engine import noise as noise_mod

    key = bytes(range(7, 39))
    monkeypatch.setattr(secrets, "token_bytes", lambda n=32: key[:n])
    from dpft.config import compose_run
    from dpft.engine import checkpoint as ckpt
    from dpft.engine import train as engine
    from dpft.engine.prepare import prepare
    from dpft.store import RunDir

    spec = compose_run([*TINY[:-1], "runtime.checkpoint_every=1", f"paths.output_dir={tmp_path}"])
    prep = prepare(spec)
    path = tmp_path / "run"
    path.mkdir()
    run = RunDir(path)
    saved = []
    real_save = ckpt.save
    monkeypatch.setattr(ckpt, "save", lambda p, state: (saved.append(dict(state)), real_save(p, state)))
    sink = run.metrics_sink()
    try:
        engine.run(prep, run, sink)
    finally:
        sink.close()
    assert saved, "no checkpoint was taken"
    source = noise_mod.NoiseSource("secure", key)
    needles = [key.hex(), str(int.from_bytes(key, "big"))]
    for step in range(0, 6):
        for purpose in (b"noise/cpu", b"poisson"):
            needles.append(str(source._seed(purpose, step)))
    blobs = [p.read_bytes() for p in path.rglob("*") if p.is_file()]
    blobs += [repr(s).encode() for s in saved]
    for blob in blobs:
        assert key not in blob
        for needle in needles:
            assert needle.encode() not in blob
    for state in saved:
        assert "noise" not in state["rng"] and state["batches"] == {}


def test_secure_noise_has_std_sigma_C_and_is_guarded():
    from dpft.engine.noise import NoiseSource

    src = NoiseSource.create("secure", 0, "x")
    z = src.for_step(1).gaussian((400_000,), 0.5, "cpu")
    # std of the sample std for n = 4e5 normals: 0.5/sqrt(2n) ≈ 5.6e-4; 6 of them
    assert float(z.std()) == pytest.approx(0.5, abs=3.5e-3)
    assert float(z.mean()) == pytest.approx(0.0, abs=6 * 0.5 / math.sqrt(4e5))
    # the guard draws (z1+z2+z3+z4)/2 after one discarded draw: not the single-draw stream
    plain = NoiseSource("entropy", src._key).for_step(1).gaussian((400_000,), 0.5, "cpu")
    assert not torch.equal(z, plain)
    again = NoiseSource("secure", src._key).for_step(1).gaussian((400_000,), 0.5, "cpu")
    assert torch.equal(z, again)  # a function of (key, step) only


@pytest.mark.parametrize("mode", ["secure", "entropy"])
def test_large_cpu_draws_split_over_threads_keep_the_distribution(mode):
    """Tensors of ≥ PARALLEL_MIN entries are drawn in fixed chunks on torch's threads, each chunk
    from its own generator seeded from the step's secret stream: every chunk must still be
    N(0, std²), the chunks independent of each other, and the draw a function of (key, step) only —
    not of the thread count (data-parallel ranks draw the same noise)."""
    from dpft.engine import noise

    src = noise.NoiseSource.create(mode, 0, "x")
    n = 2 * noise.PARALLEL_MIN
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = src.for_step(3).gaussian((n,), 0.5, "cpu")
        again = noise.NoiseSource(mode, src._key).for_step(3).gaussian((n,), 0.5, "cpu")
        torch.set_num_threads(1)
        serial = noise.NoiseSource(mode, src._key).for_step(3).gaussian((n,), 0.5, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(z, again) and torch.equal(z, serial)
    single = noise._draw(mode == "secure", (n,), 0.5, noise.NoiseSource(mode, src._key).for_step(3)._gen("cpu"), "cpu")
    assert not torch.equal(z, single)  # the chunked path ran
    a, b = z[: n // 2], z[n // 2:]
    for part in (a, b):  # n/2 = 2^18 entries: std of the sample std 0.5/sqrt(2^19) ≈ 6.9e-4; 6 of them
        assert float(part.std()) == pytest.approx(0.5, abs=4.2e-3)
        assert float(part.mean()) == pytest.approx(0.0, abs=6 * 0.5 / math.sqrt(n / 2))
    # independent chunks: the sample correlation of two independent halves is ~N(0, 1/(n/2))
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) < 6 / math.sqrt(n / 2) and not torch.equal(a, b)


@pytest.mark.parametrize("mode", ["secure", "entropy", "seeded"])
def test_a_steps_tensors_drawn_together_keep_their_stds_and_the_seeded_stream(mode):
    """`StepNoise.gaussians` (what dp_step and the audit's rebuild draw): `seeded` is the per-tensor
    stream bit for bit; the keyed modes draw the tensors of one std as one flat chunked vector — each
    tensor still N(0, std²) at its own std, the tensors independent, a function of (key, step) only."""
    from dpft.engine import noise

    src = noise.NoiseSource.create(mode, 0, "x")
    specs = [((300, 400), 0.5), ((7,), 2.0), ((512, 300), 0.5), ((90_000,), 2.0), ((3,), 0.0)]
    zs = src.for_step(2).gaussians(specs, "cpu")
    assert [tuple(z.shape) for z in zs] == [s for s, _ in specs]
    again = noise.NoiseSource(mode, src._key).for_step(2).gaussians(specs, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(zs, again))
    if mode == "seeded":
        step = src.for_step(2)
        assert all(torch.equal(z, step.gaussian(shape, std, "cpu")) for z, (shape, std) in zip(zs, specs))
    else:  # one flat vector per std: the 0.5 tensors are 273,600 ≥ PARALLEL_MIN entries, drawn in chunks
        assert sum(z.numel() for z, (_, sd) in zip(zs, specs) if sd == 0.5) >= noise.PARALLEL_MIN
    for z, (shape, std) in zip(zs, specs):
        if std == 0:
            assert not z.any()
        elif z.numel() > 1000:  # n ≥ 9e4: std of the sample std ≤ std/sqrt(2n); 6 of them
            assert float(z.std()) == pytest.approx(std, abs=6 * std / math.sqrt(2 * z.numel()))
            assert float(z.mean()) == pytest.approx(0.0, abs=6 * std / math.sqrt(z.numel()))
    a, b = zs[0].reshape(-1), zs[2].reshape(-1)[: zs[0].numel()]
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 6 / math.sqrt(a.numel())


def test_seeded_draws_do_not_depend_on_the_thread_count():
    """`seeded` keeps one stream per step, so a simulation reruns bit for bit on any machine."""
    from dpft.engine import noise

    src = noise.NoiseSource.create("seeded", 0, "x")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = src.for_step(1).gaussian((2 * noise.PARALLEL_MIN,), 0.5, "cpu")
        torch.set_num_threads(1)
        one = src.for_step(1).gaussian((2 * noise.PARALLEL_MIN,), 0.5, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_dp_step_adds_the_secure_noise_with_std_sigma_C_over_B(tiny_dp):
    """End to end through dp_step: with all examples' gradients zeroed out (lr-1 SGD, empty batch)
    the update is exactly minus the noise / B."""
    from dpft.engine.noise import NoiseSource

    dp = tiny_dp(sigma=2.0, clip=0.5, batch=4.0)
    before = {n: p.detach().clone() for n, p in dp.params.items()}
    dp.step([], 1, noise=NoiseSource.create("secure", 0, "x").for_step(1))
    z = torch.cat([(before[n] - p.detach()).flatten() for n, p in dp.params.items()])
    assert z.numel() > 100_000
    assert float(z.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02)


def test_poisson_masks_have_rate_q_and_depend_on_the_key():
    from dpft.engine.batches import PoissonBatches
    from dpft.engine.noise import NoiseSource

    n, q = 20_000, 0.05
    src = NoiseSource.create("secure", 0, "x")
    batches = PoissonBatches(n, q, src)
    sizes = [len(next(batches)) for _ in range(5)]
    for s in sizes:  # Binomial(n, q): sd = sqrt(n q (1-q)) ≈ 31; 6 sd
        assert abs(s - n * q) < 6 * math.sqrt(n * q * (1 - q))
    first = PoissonBatches(n, q, src)
    resumed = PoissonBatches(n, q, src, start=3)  # step t's mask depends on (key, t) alone
    masks = [next(first) for _ in range(3)]
    assert next(resumed) == masks[2]
    other = PoissonBatches(n, q, NoiseSource.create("secure", 0, "x"))
    assert next(other) != masks[0]


# -- resume: other data refused; lost released steps charged ---------------------------------------

def _write_sst2(d: Path, flip: bool = False) -> None:
    import random

    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "dull", "superb", "poor"]
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", 120), ("dev.tsv", 40)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            if flip and name == "train.tsv" and i == 0:
                label = 1 - label
            rows.append(" ".join(rng.choice(words) for _ in range(6)) + f"\t{label}")
        (d / name).write_text("\n".join(rows) + "\n")


def _interrupt_at(monkeypatch, at_step: int):
    """Raise KeyboardInterrupt from the progress display at `at_step` (after its record is logged,
    before that step's checkpoint): a crash that loses one logged step."""
    from dpft import tracking

    real = tracking.Progress.update

    def update(self, step, record):
        real(self, step, record)
        if step == at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.Progress, "update", update)


ARGS = ["debug=tiny", "task=sst2", "train.steps=8", "train.batch_size=24", "train.eval_every=4",
        "runtime.checkpoint_every=2", "runtime.progress=plain"]


def test_resume_on_changed_training_data_is_refused(run_dirs, tmp_path, dpft, monkeypatch):
    data = tmp_path / "data"
    _write_sst2(data)
    args = [*ARGS, f"task.data_dir={data}"]
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        r = dpft("train", *args)
    assert r.exit_code != 0
    (run,) = run_dirs(dpft.output_dir)
    assert (run / "checkpoint.pt").exists()
    _write_sst2(data, flip=True)  # one training label changed, same config and run id
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = dpft("train", *args, "--resume")
    assert r.exit_code != 0
    assert "other training data" in (r.stderr + r.stdout)
    assert "Traceback" not in r.stderr + r.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before} == before


@pytest.mark.parametrize("mode", ["secure", "seeded"])
def test_resume_charges_released_steps_in_secure_mode(read_run, run_dirs, tmp_path, dpft, monkeypatch, mode):
    data = tmp_path / "data"
    _write_sst2(data)
    args = [*ARGS, f"task.data_dir={data}", f"privacy.noise={mode}"]
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)  # steps 1-5 logged, checkpoint at step 4: step 5 was released once
        assert dpft("train", *args).exit_code != 0
    r = dpft("train", *args, "--resume")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, _ = read_run(run)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    priv = summary["privacy"]
    if mode == "secure":  # fresh noise after the resume: step 5 counts twice
        assert priv["steps"] == 9 and priv["steps_charged_twice"] == 1
        assert priv["epsilon"] > priv["epsilon_target"]
        assert priv["accountants_disagree"] is False  # the independent accountant sees 9 steps too
    else:  # the same noise is replayed: the released step is the same release
        assert priv["steps"] == 8 and "steps_charged_twice" not in priv
        ref = tmp_path / "ref"
        assert dpft("train", *args, output_dir=ref).exit_code == 0
        ref_metrics, ref_summary, _ = read_run(run_dirs(ref)[0])
        assert [m["train/loss"] for m in metrics] == [m["train/loss"] for m in ref_metrics]


def test_checkpoints_are_owner_only_whatever_the_umask(tmp_path):
    from dpft.engine import checkpoint as ckpt
    from dpft.store import RunDir

    where = RunDir(tmp_path).checkpoint
    old = os.umask(0)
    try:
        ckpt.save(where, {"run_id": "x", "step": 1})
    finally:
        os.umask(old)
    assert where.stat().st_mode & 0o777 == 0o600


# -- what runs publish; δ -------------------------------------------------------------------------

def test_nonprivate_diagnostics_are_prefixed_listed_and_switchable(tmp_path):
    m, s, _ = _train_in_process(tmp_path / "all", "method=psasc")
    keys = set().union(*m)
    assert {"train/loss", "train/batch_size", "train/cos_noised", "train/step_time"} <= keys
    assert any(k.startswith("train/method/norm_p") for k in keys)  # psasc's per-sample norm quantiles
    assert not any(k.startswith(("layer/", "method/norm_p")) or k == "step_time" for k in keys)
    assert set(s["nonprivate_metrics"]) == {k for k in keys if k.startswith("train/")}

    m, s, _ = _train_in_process(tmp_path / "dp", "method=psasc", "diagnostics.nonprivate=false")
    keys = set().union(*m)
    assert not any(k.startswith("train/") for k in keys)
    assert {"privacy/epsilon", "eval/accuracy", "lr", "step"} <= keys
    assert s["nonprivate_metrics"] == []


def test_epsilon_spent_is_logged_from_step_one_and_matches_the_accountant(tmp_path):
    from dpft.engine import accountant as acct

    m, s, _ = _train_in_process(tmp_path)
    eps = [r["privacy/epsilon"] for r in m]
    assert len(eps) == 4 and all(a < b for a, b in zip(eps, eps[1:]))
    sigma, q = s["privacy"]["sigma"], s["privacy"]["sample_rate"]
    for t, e in enumerate(eps, 1):
        ref = acct.Accountant("rdp", history=[(sigma, q, t)])
        assert e == pytest.approx(ref.epsilon(s["privacy"]["delta"]), rel=1e-12)


@pytest.mark.parametrize("extra,ok", [
    (["task.num_train=1", "train.batch_size=1"], False),      # derived δ = N^-1.1 = 1
    (["privacy.delta=0.01"], False),                           # N = 400: 1/N = 0.0025
    (["privacy.delta=0.01", "privacy.unsafe_delta=true"], True),
])
def test_delta_at_least_one_over_n_is_refused_unless_forced(run_dirs, dpft, extra, ok):
    r = dpft("train", "debug=tiny", "train.steps=1", "train.eval_every=null", "runtime.progress=none", *extra)
    if ok:
        assert r.exit_code == 0, r.stderr
        return
    assert r.exit_code != 0
    assert "1/N" in (r.stderr + r.stdout) and "Traceback" not in r.stderr + r.stdout
    assert not run_dirs(dpft.output_dir)  # nothing written


def test_unknown_noise_mode_is_one_line(run_dirs, dpft):
    r = dpft("train", "debug=tiny", "privacy.noise=urandom")
    assert r.exit_code != 0 and "privacy.noise" in (r.stderr + r.stdout)
    assert not run_dirs(dpft.output_dir)


def test_reports_say_when_epsilon_is_a_simulation():
    from types import SimpleNamespace

    from dpft.report.collect import privacy_note

    run = lambda noise, private=True: SimpleNamespace(job=SimpleNamespace(  # noqa: E731
        config={"method": {"private": private}, "privacy": {"noise": noise}}))
    assert privacy_note([run("secure"), run("entropy")]) is None
    assert "SIMULATION" in privacy_note([run("secure"), run("seeded")])
    assert privacy_note([run("seeded", private=False)]) is None  # a non-private baseline claims no ε
    old = SimpleNamespace(job=SimpleNamespace(config={"method": {"private": True}, "privacy": {}}))
    assert "public seed" in privacy_note([old])


def test_every_shipped_sweep_states_its_noise_mode_and_why():
    """A sweep's ε means something different in each mode: each sweep sets privacy.noise itself and
    its header says why (README "Threat model and noise modes")."""
    import yaml

    from dpft.engine.noise import MODES
    from dpft.sweeps.spec import PACKAGE_SWEEPS

    files = sorted(Path(PACKAGE_SWEEPS).glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        text = f.read_text()
        header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
        body = yaml.safe_load(text)
        sets = [o for o in body.get("overrides", []) if str(o).startswith("privacy.noise=")]
        assert len(sets) == 1, f"{f.name}: overrides must set privacy.noise once"
        assert sets[0].split("=", 1)[1] in MODES, f.name
        assert "privacy.noise" in header, f"{f.name}: the header must say why this noise mode"
