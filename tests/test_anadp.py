"""ANADP: per-group noise actually added, σ_eff = calibrated σ for any importance, per-group and
Mahalanobis sensitivity under adversarial inputs, importance as pure post-processing, and the
end-to-end CLI (full fine-tuning and LoRA) with ε checked against an independent accountant."""

from __future__ import annotations

import math

import pytest
import torch

from dpft.config import compose_run
from dpft.engine import accountant as acct
from dpft.errors import DpftError
from dpft.methods import build_method
from dpft.methods.anadp import allocate, group_names, shares_from_scores, sigma_eff
from dpft.models import model_inputs

TINY = ["debug=tiny", "method=anadp", "engine.grad_sample_mode=hooks", "runtime.progress=none"]


def _random_shares(g, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.distributions.Dirichlet(torch.full((g,), 0.5)).sample() + 1e-3 * torch.rand(g, generator=gen)


def _by_group(method, tensors):
    labels = group_names(list(method.params), method.granularity)
    out = {}
    for label, name in zip(labels, method.params):
        out.setdefault(label, []).append(tensors[name].double().flatten())
    return {g: torch.cat(v) for g, v in out.items()}


# -- noise --------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "layer"])
def test_measured_group_noise_matches_allocation(sgd_update, tiny_dp, granularity):
    sigma, clip, b = 1.3, 0.5, 8.0
    dp = tiny_dp("method=anadp", f"method.granularity={granularity}", sigma=sigma, clip=clip, batch=b)
    method = dp.method
    torch.manual_seed(0)
    method.set_shares(_random_shares(len(method.groups), 1))
    stds = method.group_stds()
    assert max(stds.values()) / min(stds.values()) > 2  # the test must see genuinely unequal noise
    for name, s in method.noise_std().items():
        assert s == stds[group_names([name], granularity)[0]]
    update = sgd_update(dp, [])  # empty draw: only the noise is added
    for g, z in _by_group(method, update).items():
        z = z * b  # noise on the sum
        n = z.numel()
        assert z.std().item() == pytest.approx(stds[g], rel=6 / math.sqrt(2 * n)), g


def test_warmup_and_alpha_zero_give_dpsgd_noise(tiny_dp):
    sigma, clip = 0.9, 0.7
    dp = tiny_dp("method=anadp", "method.warmup=3", sigma=sigma, clip=clip)
    params, method = dp.params, dp.method
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    for step in (1, 2):  # allocation for steps 2, 3 is still the warm-up one
        method.postprocess(grads, {}, step)
        assert list(method.noise_std().values()) == pytest.approx([sigma * clip] * len(params))
    method.postprocess(grads, {}, 3)  # step 4 is adaptive
    assert max(method.noise_std().values()) > sigma * clip * 1.01
    dp = tiny_dp("method=anadp", "method.warmup=0", "method.alpha=0", sigma=sigma, clip=clip)
    params, method = dp.params, dp.method
    method.postprocess({n: torch.randn_like(p) for n, p in params.items()}, {}, 1)
    assert list(method.noise_std().values()) == pytest.approx([sigma * clip] * len(params))


# -- budget ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(60))
def test_sigma_eff_equals_sigma_for_random_importances(seed):
    gen = torch.Generator().manual_seed(seed)
    g = int(torch.randint(1, 300, (1,), generator=gen))
    sigma = float(torch.empty(1).uniform_(0.3, 20.0, generator=gen))
    clip = float(10 ** torch.empty(1).uniform_(-3, 1, generator=gen))
    scores = 10 ** torch.empty(g, dtype=torch.float64).uniform_(-30, 5, generator=gen)
    scores[torch.rand(g, generator=gen) < 0.2] = 0.0  # e.g. LoRA B at init: zero importance
    kappa = torch.rand(g, generator=gen, dtype=torch.float64) + 1e-3
    kappa /= kappa.sum()
    alpha = float(torch.empty(1).uniform_(0, 3, generator=gen))
    floor = float(torch.empty(1).uniform_(0.01, 1, generator=gen))
    ceiling = float(torch.empty(1).uniform_(1, 50, generator=gen))
    pi = shares_from_scores(scores, kappa, alpha, floor, ceiling)
    assert float(pi.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (pi >= floor * kappa * (1 - 1e-9)).all() and (pi <= ceiling * kappa * (1 + 1e-9)).all()
    c, s = allocate(pi, kappa, clip, sigma)
    assert float(c.pow(2).sum()) == pytest.approx(clip ** 2, rel=1e-12)  # Σ C_g² = C²
    eff = sigma_eff(c, s)
    assert sigma <= eff <= sigma * (1 + 1e-8)
    # noise std stays within the configured band around DP-SGD's σC
    assert (s >= sigma * clip / math.sqrt(ceiling) * (1 - 1e-8)).all()
    assert (s <= sigma * clip / math.sqrt(floor) * (1 + 1e-8)).all()


def test_method_reports_calibrated_sigma_after_random_importance_updates(tiny_dp):
    sigma = 0.83
    dp = tiny_dp("method=anadp", "method.warmup=0", "method.alpha=2", "method.floor=0.05", sigma=sigma, clip=0.2)
    params, method = dp.params, dp.method
    for step in range(1, 6):
        grads = {n: torch.randn_like(p) * 10 ** torch.empty(1).uniform_(-4, 2) for n, p in params.items()}
        method.postprocess(grads, {}, step)
        assert method.noise_multiplier() == sigma
        assert sigma <= method.sigma_eff() <= sigma * (1 + 1e-8)
        assert method.diagnostics()["pi_entropy_norm"] < 1.0  # the allocation really is non-uniform


# -- sensitivity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_per_group_contribution_and_mahalanobis_bound(sgd_update, tiny_batch, tiny_dp, scale):
    clip, sigma = 0.3, 1.1
    dp = tiny_dp("method=anadp", sigma=sigma, clip=clip, batch=1.0, scale_head=scale)
    model, params, method = dp.model, dp.params, dp.method
    for i in range(3):
        # postprocess re-allocates after every step (warm-up: uniform), so install shares each time
        method.set_shares(_random_shares(len(method.groups), 7 + i))
        clips, stds = method.group_clips(), method.group_stds()
        method.noise_std = lambda: {n: 0.0 for n in params}  # measure the clipped contribution only
        batch = tiny_batch(1, seed=i)
        if scale > 1:  # label the losing class so the saturated softmax still has a huge gradient
            with torch.no_grad():
                logits = model(**model_inputs(model, batch.input_ids, batch.attention_mask)).logits
            batch.labels = logits.argmin(-1)
        seen = []
        post = method.postprocess
        method.postprocess = lambda g, s, t, _post=post: seen.append(g) or _post(g, s, t)
        sgd_update(dp, [batch])
        method.postprocess = post
        # read S/B (B = 1, no noise) where the engine hands it over: the weight delta of the scaled
        # head (|θ| ~ 1e2) would carry float32 cancellation error of the order of 1e-4 relative
        contrib = _by_group(method, seen[0])
        norms = {g: float(v.norm()) for g, v in contrib.items()}
        for g, nrm in norms.items():
            assert nrm <= clips[g] * (1 + 1e-4), (g, nrm, clips[g])
        maha = sigma * math.sqrt(sum(norms[g] ** 2 / stds[g] ** 2 for g in norms))
        assert maha <= 1 + 1e-4
        if scale > 1:  # the head's huge gradient is clipped to exactly its C_g
            head = [g for g in norms if g.startswith("classifier.weight")][0]
            assert norms[head] == pytest.approx(clips[head], rel=1e-3)


def test_clip_factors_bound_extreme_norms_and_reject_non_finite(tiny_dp):
    dp = tiny_dp("method=anadp", sigma=1.0, clip=0.5)
    params, method = dp.params, dp.method
    p = len(params)
    sq = torch.tensor([0.0, 1e-30, 1e-6, 1.0, 1e6, 3e38], dtype=torch.float32).repeat(p, 1)
    sq = sq * torch.rand(p, 1)
    f = method.clip_factors(sq)
    assert f.shape == sq.shape and (f >= 0).all() and (f <= 1).all()
    gsq = torch.zeros(len(method.groups), sq.shape[1], dtype=torch.float64).index_add_(
        0, method._gidx, (f.double() ** 2) * sq.double())
    clips = torch.tensor(list(method.group_clips().values()), dtype=torch.float64)[:, None]
    assert (gsq.sqrt() <= clips * (1 + 1e-6)).all()
    sq[3, 2] = float("inf")
    with pytest.raises(DpftError, match="non-finite"):
        method.clip_factors(sq)


# -- importance is post-processing ------------------------------------------------------------------
def _fingerprint(method):
    return (method._pi.clone(), method._step, {n: t.clone() for n, t in method._ema_i.items()},
            {n: t.clone() for n, t in method._ema_u.items()})


def _same(a, b):
    return (torch.equal(a[0], b[0]) and a[1] == b[1]
            and all(torch.equal(a[2][n], b[2][n]) and torch.equal(a[3][n], b[3][n]) for n in a[2]))


def test_importance_changes_only_in_postprocess_from_the_privatised_gradient(sgd_update, tiny_batch, tiny_dp):
    b, sigma, beta1 = 6.0, 1e4, 0.85  # huge noise: the privatised gradient is essentially noise
    dp = tiny_dp("method=anadp", "method.warmup=0", sigma=sigma, clip=1.0, batch=b)
    params, method = dp.params, dp.method
    seen, noise_at_call = [], []
    for attr in ("clip_factors", "noise_std", "noise_multiplier", "diagnostics", "postprocess"):
        orig = getattr(method, attr)

        def spy(*args, _orig=orig, _attr=attr, **kw):
            before = _fingerprint(method)
            if _attr == "postprocess":
                seen.append(({n: g.clone() for n, g in args[0].items()},
                             {n: p.detach().clone() for n, p in params.items()}))
            out = _orig(*args, **kw)
            if _attr == "noise_std":
                noise_at_call.append(dict(out))
            if _attr != "postprocess":
                assert _same(before, _fingerprint(method)), f"{_attr} changed the importance state"
            return out

        setattr(method, attr, spy)
    allocations = [method.group_stds()]
    for step in (1, 2, 3):
        update = sgd_update(dp, [tiny_batch(6, seed=step)], step=step, seed=step)
        method.diagnostics()
        grads, theta = seen[-1]
        for n in params:  # postprocess saw exactly the privatised mean that was applied
            torch.testing.assert_close(grads[n], update[n], rtol=1e-5, atol=1e-3 * sigma / b)
        # noise dominates the importance input: its spread is the allocated noise / B, not the signal
        z = torch.cat([grads[n].flatten() for n in params]) * b
        assert z.std().item() > 0.5 * min(noise_at_call[-1].values())
        if step == 1:  # Ī_1 = (1 − β1)·|θ_1 · G̃_1| from zero-initialised EMAs
            for n in params:
                torch.testing.assert_close(method._ema_i[n], (1 - beta1) * (theta[n] * grads[n]).abs())
        # the noise of step t was the allocation fixed by postprocess of step t − 1
        expected = {n: allocations[-1][g] for n, g in zip(params, group_names(list(params), "tensor"))}
        assert noise_at_call[-1] == expected
        allocations.append(method.group_stds())
    assert allocations[1] != allocations[0]  # importance did move the allocation


def test_state_dict_roundtrip_restores_allocation(tiny_dp):
    dp = tiny_dp("method=anadp", "method.warmup=0", sigma=1.0, clip=1.0)
    params, method = dp.params, dp.method
    for step in (1, 2):
        method.postprocess({n: torch.randn_like(p) for n, p in params.items()}, {}, step)
    fresh = tiny_dp("method=anadp", "method.warmup=0", sigma=1.0, clip=1.0).method
    fresh.load_state_dict(method.state_dict())
    assert fresh.noise_std() == method.noise_std() and fresh.group_clips() == method.group_clips()


# -- the control row and the importance signal --------------------------------------------------------
def _synthetic(*extra, sigma=1.0, clip=1.0):
    """ANADP over three 100 × 100 'tensors' (groups a, b, c), no model needed."""
    from dpft.methods import PrivacyParams

    method = build_method(compose_run(["method=anadp", "method.warmup=0", *extra]).cfg)
    params = {n: torch.nn.Parameter(torch.ones(100, 100)) for n in ("a", "b", "c")}
    method.setup(None, params, PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.01,
                                             expected_batch_size=100.0, steps=100, delta=1e-5))
    return method, params


def test_alpha_zero_is_per_group_clipping_with_dpsgd_noise():
    """The sweep's control row: whatever the scores, α = 0 keeps DP-SGD's noise σC on every group and
    only changes the clipping (C_g = C/√G per group instead of one flat C)."""
    sigma, clip = 0.9, 0.6
    method, params = _synthetic("method.alpha=0", sigma=sigma, clip=clip)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        grads = {n: torch.randn(100, 100, generator=gen) * 10.0 ** k for k, n in enumerate(params)}
        method.postprocess(grads, {n: 0.1 for n in params}, step)
        assert list(method.noise_std().values()) == pytest.approx([sigma * clip] * 3)
        assert list(method.group_clips().values()) == pytest.approx([clip / math.sqrt(3)] * 3)
        assert method.diagnostics()["pi_entropy_norm"] == pytest.approx(1.0)
    # per-group, not flat: a sample whose whole norm sits in group a is clipped to C/√G, not C
    sq = torch.tensor([[4.0], [0.0], [0.0]])
    assert float(method.clip_factors(sq)[0, 0]) == pytest.approx(clip / math.sqrt(3) / 2.0)


def test_signal_diagnostics_tell_noise_from_signal():
    """Pure noise: the sensitivity |θ·G̃| is what noise alone gives (ratio ≈ 1) and the scores rank the
    groups by their noise std and |θ|; a strong clean gradient drives the ratio towards 0."""
    method, params = _synthetic("method.alpha=0")
    with torch.no_grad():
        for k, p in enumerate(params.values()):
            p.mul_(1.0 + k)  # |θ| = 1, 2, 3
    tau = {"a": 0.01, "b": 0.03, "c": 0.02}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        grads = {n: tau[n] * torch.randn(100, 100, generator=gen) for n in params}
        method.postprocess(grads, tau, step)
    d = method.diagnostics()
    # E|θ z| = |θ|·τ·√(2/π) exactly for Gaussian z; the median over 3 groups of 10⁴ entries each has
    # a relative standard error of ~0.8% (|z| has CV 0.76, /√10⁴): 5% is over 6 standard errors
    assert d["sens_noise_ratio"] == pytest.approx(1.0, abs=0.05)
    # equal |θ|, noise stds 0.01 / 0.03 / 0.02: the pure-noise scores rank the groups by their noise
    method, params = _synthetic("method.alpha=0")
    for step in range(1, 4):
        method.postprocess({n: tau[n] * torch.randn(100, 100, generator=gen) for n in params}, tau, step)
    assert method.diagnostics()["score_noise_corr"] == pytest.approx(1.0)
    method, params = _synthetic("method.alpha=0")
    with torch.no_grad():
        for k, p in enumerate(params.values()):
            p.mul_(1.0 + k)
    for step in range(1, 4):
        method.postprocess({n: 0.01 * torch.randn(100, 100, generator=gen) for n in params},
                           {n: 0.01 for n in params}, step)
    d = method.diagnostics()
    assert d["score_theta_corr"] == pytest.approx(1.0) and math.isnan(d["score_noise_corr"])  # uniform noise
    method, params = _synthetic("method.alpha=0")
    method.postprocess({n: 1.0 + 0.01 * torch.randn(100, 100, generator=gen) for n in params},
                       {n: 0.01 for n in params}, 1)
    assert method.diagnostics()["sens_noise_ratio"] < 0.02  # 0.01·√(2/π) / 1


@pytest.mark.parametrize("importance", ["adalora", "smoothed"])
def test_smoothed_importance_separates_a_persistent_gradient_from_noise(importance):
    """A group with a persistent gradient 0.3τ under noise τ: |θ·G̃| barely notices it (E|N(0.3,1)| is
    only 4.5% above E|N(0,1)|), the EMA of G̃ (β_g = 0.9: noise std ÷ 4.4) sees it clearly."""
    method, params = _synthetic("method.alpha=0", f"method.importance={importance}")
    gen = torch.Generator().manual_seed(2)
    tau = 1.0
    signal = {"a": 0.3 * tau, "b": 0.0, "c": 0.0}
    for step in range(1, 61):
        grads = {n: signal[n] + tau * torch.randn(100, 100, generator=gen) for n in params}
        method.postprocess(grads, {n: tau for n in params}, step)
    ratio = float(method._scores[0] / method._scores[1:].mean())
    if importance == "smoothed":
        assert ratio > 1.5
        assert method.diagnostics()["sens_noise_ratio"] > 0  # finite, uses the EMA's reduced noise std
    else:
        assert ratio < 1.25


def test_smoothed_state_round_trip():
    method, params = _synthetic("method.importance=smoothed", "method.alpha=1")
    gen = torch.Generator().manual_seed(3)
    for step in (1, 2):
        method.postprocess({n: torch.randn(100, 100, generator=gen) for n in params}, {}, step)
    fresh, _ = _synthetic("method.importance=smoothed", "method.alpha=1")
    fresh.load_state_dict(method.state_dict())
    grads = {n: torch.randn(100, 100, generator=gen) for n in params}
    method.postprocess(grads, {}, 3)
    fresh.postprocess(grads, {}, 3)
    assert fresh.noise_std() == method.noise_std()


@pytest.mark.parametrize("bad", ["method.floor=0", "method.ceiling=0.5", "method.beta1=1",
                                 "method.granularity=row", "method.alpha=-1", "method.importance=fisher",
                                 "method.grad_beta=1"])
def test_bad_knobs_are_rejected(bad):
    with pytest.raises(DpftError):
        build_method(compose_run(["method=anadp", bad]).cfg)


# -- end to end -----------------------------------------------------------------------------------
def test_cli_refuses_ghost_mode(dpft):
    r = dpft("train", "debug=tiny", "method=anadp", "runtime.progress=none")
    assert r.exit_code != 0
    assert "grad_sample_mode=hooks" in (r.stdout + r.stderr + str(r.exception))


@pytest.mark.parametrize("peft", ["null", "lora"])
def test_cli_train_full_and_lora(read_run, run_dirs, dpft, peft):
    r = dpft("train", *TINY, f"model.peft={peft}", "method.warmup=2", "privacy.epsilon=3")
    assert r.exit_code == 0, r.stdout + r.stderr + repr(r.exception)
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, _ = read_run(run)
    priv = summary["privacy"]
    assert summary["method"] == "anadp"
    assert priv["epsilon"] <= 3.0
    indep = acct.independent_epsilon([(priv["sigma"], priv["sample_rate"], priv["steps"])], priv["delta"], "rdp")
    # dp_accounting's RDP uses another order grid than Opacus': they agree to ~1% (test_privacy)
    assert priv["epsilon"] == pytest.approx(indep, rel=0.01)
    assert priv["epsilon_independent"] == pytest.approx(indep, rel=1e-9)
    assert priv["history"] == [[priv["sigma"], priv["sample_rate"], priv["steps"]]]  # one σ all run
    first = next(m for m in metrics if m["step"] == 1)
    assert first["train/moved_frac"] > 0
    last = metrics[-1]
    for key in ("noise_std_min", "noise_std_max", "pi_entropy", "sigma_eff", "clip_min", "clip_max"):
        assert math.isfinite(last[f"method/{key}"]), key
    assert last["method/sigma_eff"] == pytest.approx(priv["sigma"], rel=1e-8)
    # warm-up (allocation for steps ≤ 2) is uniform, afterwards the importance reallocates
    assert first["method/noise_std_min"] == pytest.approx(first["method/noise_std_max"])
    assert last["method/adaptive"] == 1.0 and last["method/noise_std_max"] > last["method/noise_std_min"] * 1.01
    if peft == "lora":
        assert last["method/groups"] == 10  # 2 layers × (query, value) × (lora_A, lora_B) + head weight, bias
