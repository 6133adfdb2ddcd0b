"""The engine's seams: one Stepper builds every DP step (training, bench, tests), the accountant
owns its ledger, and a caller adds training rows and declares the public N without the engine
knowing why (`dpft audit`'s canaries)."""

from __future__ import annotations

import pytest
import torch

from dpft.engine import accountant as acct
from dpft.errors import DpftError


def test_accountant_history_grows_only_by_step():
    a = acct.Accountant("rdp")
    a.step(1.1, 0.05)
    a.step(1.1, 0.05, steps=2)
    a.history.append((0.1, 1.0, 1000))  # a copy: the ledger is not edited from outside
    assert a.history == [(1.1, 0.05, 3)]
    resumed = acct.Accountant("rdp", history=a.history)  # what a resumed run rebuilds from its checkpoint
    assert resumed.epsilon(1e-5) == a.epsilon(1e-5) > 0
    assert acct.Accountant("prv").epsilon(1e-5) == 0.0  # nothing spent yet


def test_extra_training_rows_and_the_declared_public_n():
    from dpft.config import compose_run
    from dpft.data.tasks import Split
    from dpft.engine.prepare import prepare

    spec = compose_run(["debug=tiny", "train.batch_size=8"])
    base = prepare(spec)
    n = len(base.train_enc)
    rows = Split([("alpha beta gamma",), ("delta epsilon zeta",)], [0, 1])
    prep = prepare(spec, extra_train=rows, extra_public_n=10)  # 2 rows in, out of 10 public candidates
    assert len(prep.train_enc) == n + 2
    assert prep.public_n() == n + 10 and prep.sample_rate == 8 / (n + 10)
    assert prep.delta == acct.default_delta(n + 10)  # δ, q and σ from the public N only
    assert prepare(spec, extra_train=rows).public_n() == n + 2  # default: the rows count as themselves
    # candidates that add no rows (`dpft audit --canary gradient`) still count in the public N
    none_in = prepare(spec, extra_public_n=10)
    assert len(none_in.train_enc) == n and none_in.public_n() == n + 10 and none_in.sample_rate == 8 / (n + 10)


def test_stepper_refuses_what_training_refuses(tiny_dp):
    with pytest.raises(DpftError, match="method anadp does not support ghost clipping"):
        tiny_dp("method=anadp", mode="bk")
    with pytest.raises(DpftError, match="needs engine.grad_sample_mode=bk or hooks"):
        tiny_dp("model.dtype=bfloat16", mode="ghost")


def test_bench_skips_the_paths_training_refuses():
    from dpft.bench import bench
    from dpft.config import compose_run

    cfg = compose_run(["debug=tiny", "method=anadp"]).cfg
    out = bench(cfg, ["anadp-hooks", "anadp-ghost"], 4, 8, 1, 0, torch.device("cpu"))
    assert set(out["paths"]) == {"anadp-hooks"}


def test_a_stepper_steps_the_schedule_and_releases_its_hooks(tiny_dp, tiny_batch):
    dp = tiny_dp(mode="bk", steps=2, method_optimizer=True, sigma=0.5)  # linear decay would reach 0
    before = {n: p.detach().clone() for n, p in dp.params.items()}
    stats = dp.step([tiny_batch(4)], 1, noise=torch.Generator().manual_seed(0))
    assert stats["batch_size"] == 4 and dp.lr > 0  # tiny_dp's schedule is constant
    assert any(not torch.equal(before[n], p) for n, p in dp.params.items())
    dp.close()
    assert dp.hooks is None
    with pytest.raises(DpftError, match="before attach"):
        dp.step([tiny_batch(4)], 2)
