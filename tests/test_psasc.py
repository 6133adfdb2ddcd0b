"""DP-PSASC / DP-PSAC (dpft/methods/psasc.py): the sensitivity bound C/s under adversarial norms,
noise σC/s measured through the real `dp_step`, hooks == ghost == a naive per-example loop, the
momentum rule, diagnostics, and ε identical to DP-SGD's through the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from omegaconf import OmegaConf

from dpft.config import compose_run
from dpft.engine.step import Batch, dp_step, per_sample_loss
from dpft.engine.hooks import attach_hooks
from dpft.errors import DpftError
from dpft.methods import PrivacyParams, build_method
from dpft.methods.psasc import PSAC, PSASC, psasc_weights

TINY = ["debug=tiny"]
# no dropout, so the per-example reference loop, hooks and ghost see the same function; a small
# vocabulary keeps hooks-mode per-sample embedding gradients (b × vocab × 32) cheap on CPU
NO_DROPOUT = ["+model.arch.hidden_dropout_prob=0.0", "+model.arch.attention_probs_dropout_prob=0.0",
              "model.arch.vocab_size=4000"]
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared 2-core box, torch's thread pool spinning against other
    processes costs ~20× (measured 3.1 s vs 0.16 s per 3 steps). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(*overrides):
    return compose_run([*TINY, *overrides]).cfg


def _method(*overrides, sigma=1.0, clip=1.0, batch=8.0, params=None, cfg=None):
    m = build_method(cfg if cfg is not None else _cfg(*overrides))
    m.setup(None, params or {}, PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.1,
                                              expected_batch_size=batch, steps=10, delta=1e-5))
    return m


# -- the per-sample rule and its bound ----------------------------------------------------------

def test_registered_names_and_configs():
    a = build_method(_cfg("method=psasc"))
    b = build_method(_cfg("method=psac"))
    assert type(a) is PSASC and a.name == "psasc"
    assert type(b) is PSAC and b.name == "psac" and isinstance(b, PSASC)  # one implementation
    assert (b.s, b.gamma) == (1.0, 1.0)  # psac = s 1, no momentum, via the psasc delta config
    assert a.s < 1.0 and a.gamma < 1.0


def test_weight_formula_and_psac_special_case():
    x = torch.tensor([0.0, 1e-3, 0.05, 0.3, 2.0, 50.0], dtype=torch.float64)
    C, s, r = 0.7, 0.3, 0.02
    want = C / (s * x + r / (x + r))
    torch.testing.assert_close(psasc_weights(x, C, s, r, "norm"), want)
    torch.testing.assert_close(psasc_weights(x, C, s, r, "scaled"), C / (s * x + r / (s * x + r)))
    # s = 1: both forms are DP-PSAC's C / (x + r/(x + r))
    psac = C / (x + r / (x + r))
    torch.testing.assert_close(psasc_weights(x, C, 1.0, r, "norm"), psac)
    torch.testing.assert_close(psasc_weights(x, C, 1.0, r, "scaled"), psac)
    # non-monotone: weight C at 0, rises to a peak near the knee, then decays like C/(s x)
    w = psasc_weights(torch.logspace(-6, 3, 200, dtype=torch.float64), C, s, r)
    peak = int(w.argmax())
    assert 0 < peak < len(w) - 1 and w[peak] > 2 * C and w[-1] < C / 100
    assert psasc_weights(torch.zeros(1), C, s, r).item() == pytest.approx(C)


@pytest.mark.parametrize("r_term", ["norm", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contribution_bounded_by_C_over_s_on_a_log_grid(r_term, dtype):
    # 0, sub-normal-ish tiny, and huge norms across wide ranges of s, r and C
    x = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-30, 30, 601, dtype=torch.float64)]).to(dtype)
    worst = 0.0
    for s in (1e-3, 0.1, 0.3, 1.0, 3.0, 100.0):
        for r in (1e-8, 1e-3, 0.01, 0.1, 1.0, 100.0):
            for C in (0.1, 1.0, 10.0):
                w = psasc_weights(x, C, s, r, r_term)
                assert w.dtype == dtype and torch.isfinite(w).all() and (w >= 0).all()
                ratio = (w.double() * x.double()).max().item() / (C / s)
                assert ratio <= 1 + 1e-6, (s, r, C, ratio)
                worst = max(worst, ratio)
    assert worst > 0.999  # the bound is tight: C/s, not a looser constant, is the sensitivity


def test_random_per_sample_gradients_respect_the_bound():
    """Property test on the path the engine uses: [P, b] squared norms in float32 → clip_factors →
    w_i·g_i, with scales from 1e-15 to 1e15, zero gradients and one-hot spikes."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        s = 10 ** (torch.rand(1, generator=gen).item() * 3 - 2)  # 0.01 .. 10
        r = 10 ** (torch.rand(1, generator=gen).item() * 4 - 4)  # 1e-4 .. 1
        C = 10 ** (torch.rand(1, generator=gen).item() * 2 - 1)
        knobs = {"name": "psasc", "s": s, "r": r, "r_term": "scaled" if trial % 2 else "norm",
                 "momentum": {"gamma": 1.0, "warmup": 0}}  # built without Hydra: 150 configs
        m = _method(clip=C, cfg=OmegaConf.create({"method": knobs}))
        P, b = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        scale = 10 ** (torch.rand(b, generator=gen) * 30 - 15)
        grads = [torch.randn(b, 7, generator=gen) * scale[:, None] for _ in range(P)]
        grads[0][0] = 0.0  # an all-zero example (in every parameter when P = 1)
        if b > 1:
            grads[-1][1] = 0.0
            grads[-1][1, 3] = 1e15  # adversarial spike
        sq = torch.stack([g.pow(2).sum(1) for g in grads])  # as the engine computes them
        w = m.clip_factors(sq)
        assert w.shape == (b,)
        contrib = torch.stack([(w[:, None].double() * g.double()).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        assert (contrib <= m.sensitivity() * (1 + 1e-5)).all(), (s, r, C, contrib.max(), m.sensitivity())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_norms_are_rejected(bad):
    m = _method("method=psasc")
    sq = torch.ones(2, 3)
    sq[1, 2] = bad
    with pytest.raises(DpftError, match="non-finite per-sample gradient"):
        m.clip_factors(sq)
    # a finite gradient whose squared norm overflows float32 is refused too, not scaled by 0·inf
    g = torch.full((1, 4), 1e30)
    with pytest.raises(DpftError, match="non-finite"):
        m.clip_factors(g.pow(2).sum(1, keepdim=True).T)


def test_sensitivity_and_noise_std_are_C_over_s():
    m = _method("method=psasc", "method.s=0.25", sigma=1.5, clip=2.0, params={"a": None, "b": None})
    assert m.sensitivity() == pytest.approx(8.0)
    assert m.noise_std() == {"a": pytest.approx(12.0), "b": pytest.approx(12.0)}  # σ·C/s
    assert m.noise_multiplier() == 1.5  # the accountant sees σ, as for DP-SGD


@pytest.mark.parametrize("override,match", [
    ("method.s=0", "method.s must be > 0"),
    ("method.r=-0.1", "method.r must be > 0"),
    ("method.momentum.gamma=0", "gamma must be in"),
    ("method.momentum.gamma=1.5", "gamma must be in"),
    ("method.momentum.warmup=-1", "warmup"),
    ("method.momentum.warmup=2.5", "warmup"),
    ("method.r_term=both", "r_term"),
    ("method.s=abc", "method.s must be a number"),
])
def test_bad_knobs_are_rejected(override, match):
    with pytest.raises(DpftError, match=match):
        build_method(_cfg("method=psasc", override))


def test_psac_refuses_psasc_knobs():
    with pytest.raises(DpftError, match="use method=psasc"):
        build_method(_cfg("method=psac", "method.s=0.5"))
    with pytest.raises(DpftError, match="use method=psasc"):
        build_method(_cfg("method=psac", "method.momentum.gamma=0.5"))


# -- momentum (post-processing) -----------------------------------------------------------------

def _grads(gen, k=2):
    return {f"p{i}": torch.randn(3, 4, generator=gen) for i in range(k)}


def test_momentum_rule_warmup_then_ema_and_state_round_trip():
    gamma, k0 = 0.25, 2
    m = _method("method=psasc", f"method.momentum.gamma={gamma}", f"method.momentum.warmup={k0}")
    gen = torch.Generator().manual_seed(1)
    seq = [_grads(gen) for _ in range(6)]
    v = None
    for t, g in enumerate(seq[:4], start=1):
        out = m.postprocess(g, {n: 0.1 for n in g}, t)
        if t <= k0:
            assert all(out[n] is g[n] for n in g)  # warm-up: v_t = G̃_t, untouched
            v = {n: x.clone() for n, x in g.items()}
        else:
            v = {n: (1 - gamma) * v[n] + gamma * g[n] for n in g}
            for n in g:
                torch.testing.assert_close(out[n], v[n])
    # resume: a fresh method loaded from state_dict continues the same average
    state = m.state_dict()
    m2 = _method("method=psasc", f"method.momentum.gamma={gamma}", f"method.momentum.warmup={k0}")
    m2.load_state_dict(state)
    out_a = m.postprocess(seq[4], {}, 5)
    out_b = m2.postprocess(seq[4], {}, 5)
    v = {n: (1 - gamma) * v[n] + gamma * seq[4][n] for n in v}
    for n in v:
        torch.testing.assert_close(out_a[n], v[n])
        torch.testing.assert_close(out_b[n], v[n])
    # the returned tensor is a copy: mutating it (an optimizer touching p.grad) leaves v_t intact
    out_a["p0"].zero_()
    again = m.postprocess(seq[5], {}, 6)
    torch.testing.assert_close(again["p0"], (1 - gamma) * v["p0"] + gamma * seq[5]["p0"])


def test_momentum_off_and_zero_warmup():
    m = _method("method=psac")
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 4):
        g = _grads(gen)
        out = m.postprocess(g, {}, t)
        assert all(out[n] is g[n] for n in g)  # γ = 1: the privatised gradient, same objects
    assert m.state_dict()["momentum"] is None
    m = _method("method=psasc", "method.momentum.gamma=0.5", "method.momentum.warmup=0")
    g1, g2 = _grads(gen), _grads(gen)
    assert m.postprocess(g1, {}, 1)["p0"] is g1["p0"]  # v_1 = G̃_1, no zero-initialised bias
    torch.testing.assert_close(m.postprocess(g2, {}, 2)["p0"], 0.5 * g1["p0"] + 0.5 * g2["p0"])


def test_diagnostics_are_quantiles_of_what_clip_factors_saw():
    m = _method("method=psasc", "method.s=0.5")
    assert all(math.isnan(v) for v in m.diagnostics().values())  # nothing seen yet
    # two micro-batches in one step: the diagnostics cover both
    sq1 = torch.tensor([[1.0, 4.0, 0.0]])
    sq2 = torch.tensor([[9.0, 0.25]])
    w = torch.cat([m.clip_factors(sq1), m.clip_factors(sq2)]).double()
    m.postprocess({}, {}, 1)
    d = m.diagnostics()
    norms = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5], dtype=torch.float64)
    assert d["norm_p50"] == pytest.approx(1.0) and d["norm_p90"] == pytest.approx(torch.quantile(norms, 0.9).item())
    assert d["norm_p10"] == pytest.approx(torch.quantile(norms, 0.1).item())
    assert d["weight_p50"] == pytest.approx(torch.quantile(w, 0.5).item(), rel=1e-6)
    assert d["contrib_max_frac"] == pytest.approx((w * norms).max().item() / m.sensitivity(), rel=1e-6)
    assert 0 < d["contrib_max_frac"] < 1
    m.postprocess({}, {}, 2)  # an empty Poisson draw: no stale numbers from the previous step
    assert all(math.isnan(v) for v in m.diagnostics().values())
    off = _method("method=psasc", "method.log_norms=false")
    off.clip_factors(sq1)
    off.postprocess({}, {}, 1)
    assert off.diagnostics() == {}


# -- through the engine's dp_step on a tiny BERT ---------------------------------------------------

class Recorder:
    """Stands in for the optimizer: keeps the update direction dp_step hands over; with ``lr`` it
    also takes the SGD step, so the next step's gradients differ."""

    def __init__(self, params, lr=0.0):
        self.params, self.seen, self.lr = params, [], lr

    def step(self):
        self.seen.append({n: p.grad.detach().clone() for n, p in self.params.items()})
        with torch.no_grad():
            for p in self.params.values():
                p.add_(p.grad, alpha=-self.lr)

    def zero_grad(self, set_to_none=True):
        for p in self.params.values():
            p.grad = None


@pytest.fixture(scope="module")
def tiny():
    from dpft.models import load_classifier

    cfg = compose_run([*TINY, *NO_DROPOUT]).cfg
    gen = torch.Generator().manual_seed(3)
    b, t = 6, 10
    batch = Batch(torch.randint(1000, 4000, (b, t), generator=gen), torch.ones(b, t, dtype=torch.long),
                  torch.randint(0, 2, (b,), generator=gen))
    return cfg, (lambda: load_classifier(cfg.model, 2, 0)), batch


def _engine_step(tiny, mode, overrides, sigma, clip=0.5, chunks=None, steps=1, lr=0.0):
    cfg, make_model, batch = tiny
    model = make_model()
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    method = build_method(compose_run([*TINY, *overrides]).cfg)
    method.setup(model, params, PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.1,
                                              expected_batch_size=float(len(batch)), steps=10, delta=1e-5))
    hooks = attach_hooks(model, mode, clip)
    rec = Recorder(params, lr)
    noise = torch.Generator().manual_seed(11)  # same seed in both modes: identical noise draws
    if chunks is None:
        chunks = [Batch(batch.input_ids[:4], batch.attention_mask[:4], batch.labels[:4]),
                  Batch(batch.input_ids[4:], batch.attention_mask[4:], batch.labels[4:])]
    try:
        for step in range(1, steps + 1):
            dp_step(model=model, chunks=chunks, method=method, params=params, optimizer=rec,
                    noise_generator=noise, mode=mode, hooks=hooks, step=step, alignment=False)
    finally:
        hooks.cleanup()
    return rec.seen, method, model, params


def _reference_sum(tiny, overrides, clip=0.5):
    """Σ_i w(‖g_i‖)·g_i from one plain autograd backward per example (no Opacus)."""
    cfg, make_model, batch = tiny
    model = make_model()
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    m = build_method(compose_run([*TINY, *overrides]).cfg)
    m.setup(model, params, PrivacyParams(sigma=0.0, clip_norm=clip, sample_rate=0.1,
                                         expected_batch_size=float(len(batch)), steps=10, delta=1e-5))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    raw = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(batch)):
        one = Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.labels[i:i + 1])
        gs = torch.autograd.grad(per_sample_loss(model, one).sum(), list(params.values()))
        sq = torch.stack([g.pow(2).sum() for g in gs])[:, None]
        w = float(m.clip_factors(sq)[0])
        for n, g in zip(params, gs):
            total[n] += w * g
            raw[n] += g
    return total, raw, m


@pytest.mark.parametrize("overrides", [
    ["method=psasc", "method.s=0.3", "method.r=0.05", "method.momentum.gamma=1.0"],
    ["method=psasc", "method.s=2.0", "method.r=0.5", "method.r_term=scaled", "method.momentum.gamma=1.0"],
    ["method=psac", "method.r=0.1"],
], ids=["psasc-norm", "psasc-scaled", "psac"])
def test_hooks_and_ghost_give_the_same_aggregated_gradient(tiny, overrides):
    overrides = [*overrides, *NO_DROPOUT]
    B = float(len(tiny[2]))
    (hooks_g,), _, _, _ = _engine_step(tiny, "hooks", overrides, sigma=0.0)
    (ghost_g,), m, _, _ = _engine_step(tiny, "ghost", overrides, sigma=0.0)
    ref, raw, _ = _reference_sum(tiny, overrides)
    diff = 0.0
    for n in ref:
        # dp_step hands over (S + 0)/B: compare the scaled sums
        torch.testing.assert_close(hooks_g[n] * B, ref[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ghost_g[n] * B, ref[n], rtol=1e-4, atol=1e-6)
        diff += float((ref[n] - raw[n]).pow(2).sum())
    assert diff > 1e-6  # the weights are not all 1: the comparison would catch a skipped scaling
    d = m.diagnostics()
    assert d["weight_p10"] != d["weight_p90"]  # examples on different parts of the weight curve


def test_hooks_and_ghost_agree_with_momentum_over_steps(tiny):
    # SGD steps so the gradients change between steps; noise on, drawn identically in both modes,
    # so the EMA averages real privatised gradients
    overrides = ["method=psasc", "method.s=0.5", "method.momentum.gamma=0.4", "method.momentum.warmup=1",
                 *NO_DROPOUT]
    outs = {mode: _engine_step(tiny, mode, overrides, sigma=0.5, steps=3, lr=0.5)[0] for mode in ("hooks", "ghost")}
    for t in range(3):
        for n in outs["hooks"][t]:
            torch.testing.assert_close(outs["hooks"][t][n], outs["ghost"][t][n], rtol=1e-4, atol=1e-6)
    name = "classifier.weight"
    assert not torch.allclose(outs["hooks"][0][name], outs["hooks"][2][name])  # the steps did differ


def test_noise_std_measured_through_dp_step_is_sigma_C_over_s(tiny):
    """G_noisy − G_clean = Z/B on the same batch and weights; std(Z) over ~170k entries must be
    σ·C/s (= 4.0 here), clearly not DP-SGD's σ·C (= 1.0)."""
    sigma, clip, s = 2.0, 0.5, 0.25
    overrides = ["method=psasc", f"method.s={s}", "method.momentum.gamma=1.0", *NO_DROPOUT]
    B = float(len(tiny[2]))
    (noisy,), m, _, _ = _engine_step(tiny, "hooks", overrides, sigma=sigma, clip=clip)
    (clean,), _, _, _ = _engine_step(tiny, "hooks", overrides, sigma=0.0, clip=clip)
    z = torch.cat([((noisy[n] - clean[n]) * B).flatten() for n in noisy]).double()
    want = sigma * clip / s
    assert z.numel() > 100_000  # relative error of the std estimate ≈ 1/sqrt(2n) ≈ 0.2%
    assert z.std().item() == pytest.approx(want, rel=0.01)
    assert abs(z.mean().item()) < 0.01 * want
    assert m.noise_std()[next(iter(noisy))] == pytest.approx(want)


# -- through the CLI: the accountant sees exactly DP-SGD's (σ, q, steps) -----------------------------

@pytest.fixture
def trained(dpft, run_dirs, read_run):
    """trained(*overrides) -> (metrics, summary, meta) of a 4-step tiny run through the CLI."""
    def train(*args):
        r = dpft("train", *TINY, "train.steps=4", "train.eval_every=2", "runtime.progress=none",
                 "runtime.num_threads=1", *args)
        assert r.exit_code == 0, r.stderr
        runs = run_dirs(dpft.output_dir)
        newest = max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)
        return read_run(newest)

    return train


def test_cli_epsilon_sigma_sensitivity_match_dpsgd(trained):
    fixed = ["privacy.noise_multiplier=0.9", "privacy.clip_norm=0.5"]
    _, base, _ = trained("method=dpsgd", *fixed)
    metrics, ps, _ = trained("method=psasc", "method.s=0.25", "method.momentum.warmup=2", *fixed,
                              "engine.grad_sample_mode=hooks")
    a, b = base["privacy"], ps["privacy"]
    assert ps["method"] == "psasc"
    assert b["sigma"] == a["sigma"] == 0.9 and b["history"] == a["history"]  # same (σ, q, steps) fed
    assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-12) and 0 < b["epsilon"] < float("inf")
    assert (a["sensitivity"], b["sensitivity"]) == (0.5, pytest.approx(2.0))  # C vs C/s
    # non-private diagnostics are logged every step; the bound holds on the real run
    # per-sample norm quantiles: non-private diagnostics, under train/
    assert all(0 < m["train/method/contrib_max_frac"] <= 1 for m in metrics)
    assert all(m["train/method/norm_p10"] <= m["train/method/norm_p50"] <= m["train/method/norm_p90"] for m in metrics)
    # momentum is the post-processing step: identity during warm-up, active afterwards
    assert [m["train/improvement"] == 0.0 for m in metrics] == [True, True, False, False]


def test_cli_psac_ghost_calibrates_the_same_sigma(trained):
    _, base, _ = trained("method=dpsgd")
    metrics, ps, _ = trained("method=psac")  # ghost: the default
    a, b = base["privacy"], ps["privacy"]
    assert ps["method"] == "psac" and b["sigma"] == a["sigma"] and b["history"] == a["history"]
    assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-12) and b["epsilon"] <= b["epsilon_target"]
    assert b["sensitivity"] == a["sensitivity"] == 1.0  # s = 1
    assert all(m["train/improvement"] == 0.0 for m in metrics)  # no momentum


def test_cli_bad_knob_is_one_line_exit_2(run_dirs, dpft):
    r = dpft("train", *TINY, "method=psasc", "method.s=0")
    assert r.exit_code == 2
    assert "method.s must be > 0" in r.stderr and "Traceback" not in r.stderr
    assert run_dirs(dpft.output_dir) == []  # rejected before the run directory is written
