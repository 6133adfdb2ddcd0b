"""`dpft bench` measures every requested path side by side and reports ratios to non-private."""

from __future__ import annotations

import json
import math

import pytest

from dpft.bench import largest_batch
from dpft.config import compose_run
from dpft.errors import DpftError


def test_bench_json_side_by_side(dpft):
    r = dpft("bench", "debug=tiny", "--batch", "8", "--length", "16", "--steps", "2", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["paths"]) == {"nonprivate", "dpsgd-hooks", "dpsgd-ghost"}
    assert out["paths"]["nonprivate"]["time_ratio"] == 1.0
    for res in out["paths"].values():
        assert res["step_s"] > 0 and res["steps"] == 2 and res["time_ratio"] > 0
        assert res["cpu_s"] > 0 and res["cpu_ratio"] > 0  # process CPU time: robust to other jobs
    assert out["device"].startswith("cpu") and out["batch_size"] == 8 and out["length"] == 16


def test_bench_rejects_bad_sizes(dpft):
    r = dpft("bench", "debug=tiny", "--batch", "0")
    assert r.exit_code == 2 and "--batch" in r.stderr
    r = dpft("bench", "debug=tiny", "--interleave", "--warmup", "1")
    assert r.exit_code == 2 and "--warmup >= 2" in r.stderr and "Traceback" not in r.stderr


def test_bench_times_opacus_own_paths_beside_dpft(dpft):
    """The comparator paths run Opacus' make_private (hooks, ghost) in the same process, micro-batched."""
    r = dpft("bench", "debug=tiny", "runtime.physical_batch_size=4", "--batch", "8", "--length", "16",
             "--steps", "1", "--warmup", "1", "--json", "--paths", "nonprivate,opacus-hooks,opacus-ghost,dpsgd-bk")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["paths"]) == {"nonprivate", "opacus-hooks", "opacus-ghost", "dpsgd-bk"}
    for res in out["paths"].values():
        assert res["step_s"] > 0 and res["peak_mem_bytes"] >= 0


def test_bench_rejects_unknown_opacus_path(dpft):
    r = dpft("bench", "debug=tiny", "--paths", "nonprivate,opacus-bk")
    assert r.exit_code == 2 and "opacus-hooks, opacus-ghost" in r.stderr and "Traceback" not in r.stderr


def test_dpft_clipped_sum_equals_opacus_make_private(opacus_update, sgd_update, tiny_batch, tiny_dp):
    """Independent implementation check: with σ = 0 and SGD at lr 1, one step of Opacus' own
    make_private (hooks, and ghost with its two-backward loss; two micro-batches through
    signal_skip_step) moves every parameter exactly as dpft's engine does in hooks, ghost and bk:
    the same per-sample clipping (with C small enough that every example is clipped) and the same
    division by the expected batch size."""
    import torch

    from dpft.engine.batches import Encoded
    from dpft.engine.batches import chunks as split

    b = tiny_batch(b=8, t=12)
    chunks = split(Encoded(b.input_ids, b.attention_mask, b.labels), list(range(8)), 4, "cpu")
    clip = 1e-3
    updates = {}
    for mode in ("hooks", "ghost", "bk"):
        dp = tiny_dp(mode=mode, sigma=0.0, clip=clip, batch=8.0)
        updates[mode] = sgd_update(dp, chunks)
        dp.close()
    for mode in ("hooks", "ghost"):
        theirs = opacus_update(mode, clip, 8, chunks)
        total = torch.cat([u.flatten() for u in theirs.values()]).norm()
        assert 0 < total <= clip * 1.0001  # every example clipped to C, mean of 8 → norm ≤ C
        flat = torch.cat([theirs[n].flatten() for n in sorted(theirs)])
        for ours_mode, ours in updates.items():
            assert set(ours) == set(theirs)
            mine = torch.cat([ours[n].flatten() for n in sorted(theirs)])
            assert (mine - flat).norm() <= 1e-4 * flat.norm(), f"{ours_mode} vs opacus-{mode}"
            for n in theirs:  # per tensor: fp32 summation order and the (before - after) read-out differ (≤ 1e-3 seen)
                # (key biases have a zero gradient, softmax being shift-invariant: absolute check only)
                scale = max(theirs[n].norm(), 1e-6 * flat.norm())
                err = (ours[n] - theirs[n]).norm() / scale
                assert err <= 5e-3, f"{ours_mode} vs opacus-{mode}: {n} relative error {err:.2e}"


@pytest.mark.parametrize("start,limit,threshold", [(32, 1024, 300), (32, 1024, 32), (32, 1024, 1024), (32, 1024, 5000),
                                                   (32, 1024, 1), (32, 1024, 0), (1, 7, 6), (64, 48, 40)])
def test_largest_batch_search(start, limit, threshold):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= threshold

    got = largest_batch(fits, start, limit)
    assert got == (min(threshold, limit) if threshold >= 1 else None)
    assert all(1 <= b <= limit for b in calls)
    assert len(calls) <= 2 * math.ceil(math.log2(max(limit, 2))) + 2  # doubling + bisection, not a scan


def test_fits_treats_cuda_oom_as_does_not_fit_and_cleans_up(monkeypatch):
    """The per-batch probe behind --max-batch: an out-of-memory step is 'does not fit', hooks are
    removed whatever happens, and other errors are not swallowed."""
    import torch

    import dpft.bench as bench

    cleaned = []

    def fake_build(base, cfg, path, chunks, b, total, device):
        def step(i):
            if len(chunks[0].labels) > 12:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            if len(chunks[0].labels) == 7:
                raise ValueError("a real bug")
        return bench._Path(model=None, step=step, cleanup=lambda: cleaned.append(len(chunks[0].labels)))

    monkeypatch.setattr(bench, "_build_path", fake_build)
    cfg = compose_run(["debug=tiny"]).cfg
    fits = lambda b: bench._fits(None, cfg, "dpsgd-bk", b, 8, 100, torch.device("cpu"))  # noqa: E731
    assert fits(12) and not fits(13)
    with pytest.raises(ValueError):
        fits(7)
    assert cleaned == [12, 13, 7]
    assert largest_batch(fits, 4, 64) == 12


def test_max_batch_needs_cuda(dpft):
    r = dpft("bench", "debug=tiny", "--max-batch", "64", "--steps", "1", "--warmup", "0")
    assert r.exit_code == 2 and "--max-batch needs a CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_bench_interleave_cli_end_to_end(dpft):
    r = dpft("bench", "debug=tiny", "--batch", "8", "--length", "16", "--steps", "2", "--warmup", "2", "--json",
             "--paths", "nonprivate,dpsgd-bk", "--interleave")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schedule"].startswith("interleaved")
    assert out["paths"]["nonprivate"]["time_ratio"] == 1.0
    bk = out["paths"]["dpsgd-bk"]
    assert bk["steps"] == 2 and bk["time_ratio"] > 0 and bk["cpu_ratio"] > 0 and bk["peak_mem_bytes"] >= 0


def test_bench_interleaved_rounds_pair_each_path_with_its_own_rounds_baseline(monkeypatch):
    """A machine whose speed changes 5× between rounds: the per-round ratios see the true 1.3× in
    every round. The fake clock advances only inside the fake steps, so the check is exact on any
    machine."""
    import time as real_time

    import torch

    import dpft.bench as bench_mod

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

        process_time = perf_counter

        def strftime(self, *a):
            return real_time.strftime(*a)

    clock, log = Clock(), []
    speed = [1.0, 1.0, 2.0, 5.0, 3.0]  # the machine's slowness in each round (2 warm-ups, then 3 timed)

    def fake_build(base, cfg, path, chunks, batch_size, total_steps, device):
        cost = {"nonprivate": 1.0, "dpsgd-bk": 1.3}[path]

        def step(i):
            log.append((path, i))
            clock.now += cost * speed[i]
        return bench_mod._Path(model=None, step=step)

    monkeypatch.setattr(bench_mod, "time", clock)
    monkeypatch.setattr(bench_mod, "_build_path", fake_build)
    monkeypatch.setattr(bench_mod, "_RssPeak", None)  # not used off CPU; must not be touched either
    dev = torch.device("meta")
    runs = bench_mod._interleaved(None, None, ["nonprivate", "dpsgd-bk"], [], 8, 3, 2, dev)
    # each path's warm-ups right after its build (its memory), then round-robin, the first path rotating
    assert log == [("nonprivate", 0), ("nonprivate", 1), ("dpsgd-bk", 0), ("dpsgd-bk", 1),
                   ("nonprivate", 2), ("dpsgd-bk", 2), ("dpsgd-bk", 3), ("nonprivate", 3),
                   ("nonprivate", 4), ("dpsgd-bk", 4)]
    np_, bk = runs["nonprivate"], runs["dpsgd-bk"]
    ratios = sorted(a / b for a, b in zip(bk.times, np_.times))
    assert ratios == pytest.approx([1.3, 1.3, 1.3]) and len(bk.times) == 3  # the warm-ups are not timed
    with pytest.raises(DpftError, match="--warmup >= 2"):
        bench_mod._interleaved(None, None, ["nonprivate"], [], 8, 3, 1, dev)
