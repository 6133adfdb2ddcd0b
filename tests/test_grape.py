"""DP-GRAPE (method=grape): projected per-sample gradients against the materialised path, the
privacy invariants in the projected space, Adam in the projected space, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpft.config import compose_run
from dpft.engine import accountant as acct
from dpft.engine.hooks import attach_hooks
from dpft.engine.step import per_sample_loss
from dpft.errors import DpftError
from dpft.methods.grape import GrapeAdam, Projector, ProjectedLinear
from dpft.models import load_classifier, model_inputs


@pytest.fixture
def grape_dp(tiny_dp):
    """grape_dp(*overrides, mode, sigma, clip, batch, scale_head) -> tiny_dp's Stepper for
    method=grape with its own optimizer (GrapeAdam), planned for 100 steps."""
    def build(*overrides, mode="hooks", sigma=1.0, clip=1.0, batch=8.0, scale_head=None):
        return tiny_dp("method=grape", *overrides, mode=mode, sigma=sigma, clip=clip, batch=batch,
                       scale_head=scale_head, steps=100, method_optimizer=True)

    return build


def update_received(dp, chunks, step=1, seed=0):
    """One step of the Stepper `dp`; returns what apply_update received (the privatised mean,
    projected space) and, for projected weights, that tensor mapped back with the step's P."""
    seen = {}
    method = dp.method
    orig = method.apply_update

    def spy(params_, grads, optimizer, step_):
        seen.update({n: g.detach().clone() for n, g in grads.items()})
        seen["_back"] = {n: pr.back(grads[n]) for n, pr in method.projectors.items()}
        orig(params_, grads, optimizer, step_)

    method.apply_update = spy
    try:
        dp.step(chunks, step, noise=torch.Generator().manual_seed(seed))
    finally:
        method.apply_update = orig
    return seen


# ---------------------------------------------------------------- exactness of the projection


@pytest.mark.parametrize("side", ["auto", "in", "out"])
def test_projected_grad_samples_equal_projection_of_materialised(grape_dp, tiny_batch, side, monkeypatch):
    # every b × m × n-shaped Linear is projected here (pooler too), so any such tensor is a leak
    dp = grape_dp(f"method.side={side}", "method.rank=8", "method.layers.exclude=[classifier]")
    model, params, method = dp.model, dp.params, dp.method
    assert {type(m) for _, m in method._layers} == {ProjectedLinear}
    sides = {pr.side for pr in method.projectors.values()}
    assert sides == ({"in", "out"} if side == "auto" else {side})  # tiny BERT has 64×32 and 32×64
    ref = load_classifier(compose_run(["debug=tiny"]).cfg.model, 2, seed=0).train()  # plain nn.Linear
    ref_hooks = attach_hooks(ref, "hooks", 1.0)
    batch = tiny_batch(5, 10)
    torch.manual_seed(5)  # same dropout masks in both models
    per_sample_loss(ref, batch).sum().backward()
    full = {n: p.grad_sample for n, p in ref.named_parameters() if p.requires_grad}

    shapes = []  # every einsum output while the projected hooks run: none may be b × m × n
    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda *a, **k: shapes.append(tuple((out := real(*a, **k)).shape)) or out)
    torch.manual_seed(5)
    per_sample_loss(model, batch).sum().backward()
    monkeypatch.setattr(torch, "einsum", real)
    for name, p in params.items():
        proj = method.projectors.get(name)
        if proj is None:
            torch.testing.assert_close(p.grad_sample, full[name])
            continue
        assert p.grad_sample.shape == (5, *proj.projected_shape)
        torch.testing.assert_close(p.grad_sample, proj.project(full[name]), rtol=1e-4, atol=1e-6)
        assert (5, *p.shape) not in shapes, f"{name}: the b × m × n per-sample gradient was formed"
    ref_hooks.cleanup()


def test_projection_matrix_is_regenerated_not_stored_and_refreshed(grape_dp, tiny_batch):
    dp = grape_dp("method.refresh=2", "method.reset_moments=false", sigma=0.5)
    params, method, opt = dp.params, dp.method, dp.optimizer
    proj = next(iter(method.projectors.values()))
    assert not any(isinstance(v, torch.Tensor) for v in vars(proj).values())
    torch.testing.assert_close(proj.matrix("cpu"), proj.matrix("cpu"))  # same seed, same P
    seeds = []
    for step in range(1, 6):
        seeds.append(proj.seed)
        update_received(dp, [tiny_batch(4, seed=step)], step=step)
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] != seeds[4]
    pname = next(iter(method.projectors))
    state = opt.state[params[pname]]
    assert state["step"] == 5 and state["exp_avg"].shape == proj.projected_shape  # kept across refreshes
    # resume: a fresh method restores the same projection from its state
    dp = grape_dp("method.refresh=2")
    other = dp.method
    other.load_state_dict(method.state_dict())
    assert next(iter(other.projectors.values())).seed == proj.seed
    # a different projection seed gives a different P
    dp = grape_dp("method.refresh=2", "method.seed=7")
    third = dp.method
    assert next(iter(third.projectors.values())).seed != seeds[0]


def test_reset_moments_on_refresh(grape_dp, tiny_batch):
    dp = grape_dp("method.refresh=2", "method.reset_moments=true")
    params, method, opt = dp.params, dp.method, dp.optimizer
    pname = next(iter(method.projectors))
    for step in (1, 2, 3):
        update_received(dp, [tiny_batch(4, seed=step)], step=step)
    assert opt.state[params[pname]]["step"] == 1  # reset after step 2, one step in the new subspace
    other = next(n for n in params if n not in method.projectors)
    assert opt.state[params[other]]["step"] == 3


# ---------------------------------------------------------------- privacy in the projected space


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_std_sigma_C_in_the_projected_space(grape_dp, mode):
    sigma, clip, b = 1.7, 0.5, 8.0
    dp = grape_dp(mode=mode, sigma=sigma, clip=clip, batch=b)
    params, method = dp.params, dp.method
    seen = update_received(dp, [])  # empty Poisson draw: only noise
    for name, p in params.items():
        assert seen[name].shape == method.space_shape(name, p)
    z = torch.cat([seen[n].flatten() for n in params]) * b
    n = z.numel()
    assert n == sum(math.prod(method.space_shape(k, p)) for k, p in params.items())
    assert n < sum(p.numel() for p in params.values())  # noise lives in the small space
    assert z.std().item() == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * n))
    assert abs(z.mean().item()) < 5 * sigma * clip / math.sqrt(n)
    proj_z = torch.cat([seen[k].flatten() for k in method.projectors]) * b
    assert proj_z.std().item() == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * proj_z.numel()))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_each_example_contributes_at_most_C(grape_dp, tiny_batch, mode, scale):
    clip = 0.3
    dp = grape_dp(mode=mode, sigma=0.0, clip=clip, batch=1.0, scale_head=scale)
    model, params, method = dp.model, dp.params, dp.method
    for proj in method.projectors.values():  # whatever P's entries: clipping is after projection
        proj.std = 1e3
    for i in range(3):
        batch = tiny_batch(1, seed=i)
        if scale > 1:  # label the losing class so the saturated softmax still has a huge gradient
            with torch.no_grad():
                logits = model(**model_inputs(model, batch.input_ids, batch.attention_mask)).logits
            batch.labels = logits.argmin(-1)
        seen = update_received(dp, [batch], step=i + 1)
        norm = math.sqrt(sum(float(seen[n].double().pow(2).sum()) for n in params))
        assert norm <= clip * (1 + 1e-4), norm
        if scale > 1:
            assert norm == pytest.approx(clip, rel=1e-3)


def test_hooks_ghost_and_bk_give_the_same_privatised_gradient(grape_dp, tiny_batch):
    out = {}
    for mode in ("hooks", "ghost", "bk"):
        dp = grape_dp(mode=mode, sigma=0.5, clip=0.05, batch=6.0)
        params = dp.params
        out[mode] = update_received(dp, [tiny_batch(6, seed=3)], seed=11)
    for name in params:
        torch.testing.assert_close(out["ghost"][name], out["hooks"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["bk"][name], out["hooks"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_cli_end_to_end_spends_dp_sgd_epsilon(read_run, run_dirs, dpft, mode):
    r = dpft("train", "debug=tiny", "method=grape", f"engine.grad_sample_mode={mode}", "method.rank=8",
             "privacy.epsilon=3", "privacy.delta=1e-3")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, meta = read_run(run)
    led = summary["privacy"]
    # ε as DP-SGD: the σ DP-SGD calibrates for the same (ε, δ, q, T), composed the same way
    q = 32 / 400
    sigma = acct.calibrate_sigma(3.0, 1e-3, q, 6, "rdp")
    assert led["sigma"] == pytest.approx(sigma, rel=1e-12) and led["sensitivity"] == led["clip_norm"]
    assert led["history"] == [[pytest.approx(sigma), pytest.approx(q), 6]]
    dpsgd = acct.Accountant("rdp", history=[(sigma, q, 6)])
    assert led["epsilon"] == pytest.approx(dpsgd.epsilon(1e-3), rel=1e-9)
    assert 0.95 * 3 <= led["epsilon"] <= 3.0 and led["accountants_disagree"] is False
    assert summary["method"] == "grape" and meta["status"] == "done"
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    fracs = {m["method/noised_dims_frac"] for m in metrics}
    assert len(fracs) == 1 and 0 < fracs.pop() < 1
    assert metrics[0]["train/moved_frac"] == 1.0  # every tensor, projected ones included, moved
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [3, 6]


# ---------------------------------------------------------------- Adam in the projected space


@pytest.fixture
def dpadam_dp(tiny_dp):
    """dpadam_dp(sigma, clip, batch, lr) -> tiny_dp's Stepper for DP-Adam (method=dpsgd, AdamW at lr)."""
    def build(sigma, clip, batch, lr):
        return tiny_dp(f"optim.lr={lr}", sigma=sigma, clip=clip, batch=batch, steps=100, method_optimizer=True)

    return build


def test_rank_null_is_exactly_dp_adam(grape_dp, dpadam_dp, tiny_batch):
    runs = {}
    for name, dp in (("grape", grape_dp("method.rank=null", sigma=0.8, clip=0.1, batch=6.0)),
                     ("dpadam", dpadam_dp(0.8, 0.1, 6.0, 1e-3))):
        assert isinstance(dp.optimizer, GrapeAdam if name == "grape" else torch.optim.AdamW)
        for step in (1, 2, 3):
            torch.manual_seed(step)  # same dropout masks in both runs
            dp.step([tiny_batch(6, seed=step)], step, noise=torch.Generator().manual_seed(step))
        runs[name] = {n: p.detach().clone() for n, p in dp.params.items()}
    for n in runs["dpadam"]:
        torch.testing.assert_close(runs["grape"][n], runs["dpadam"][n], rtol=1e-5, atol=1e-7)


def test_adam_moments_are_the_projection_of_dp_adams(grape_dp, dpadam_dp, tiny_batch):
    """No clipping, no noise, lr ≈ 0 (1e-30: the weights do not move in float32), fixed P:
    Adam's first moment is linear in the gradients, so GRAPE's projected moment must equal the
    P-projection of DP-Adam's."""
    g = grape_dp("optim.lr=1e-30", sigma=0.0, clip=1e6, batch=4.0)
    d = dpadam_dp(0.0, 1e6, 4.0, 1e-30)
    for step in (1, 2, 3):
        for dp in (g, d):
            torch.manual_seed(step)  # same dropout masks in both models
            dp.step([tiny_batch(4, seed=step)], step, noise=torch.Generator().manual_seed(0))
    for name, p in g.params.items():
        gs, ds = g.optimizer.state[p], d.optimizer.state[d.params[name]]
        proj = g.method.projectors.get(name)
        if proj is None:
            torch.testing.assert_close(gs["exp_avg"], ds["exp_avg"], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(gs["exp_avg_sq"], ds["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        else:
            assert gs["exp_avg"].shape == gs["exp_avg_sq"].shape == proj.projected_shape
            torch.testing.assert_close(gs["exp_avg"], proj.project(ds["exp_avg"]), rtol=1e-4, atol=1e-8)


def test_update_direction_in_expectation_is_dp_adams(grape_dp, dpadam_dp, tiny_batch):
    """Over the projection's randomness, the back-projected gradient GRAPE's Adam receives is
    unbiased for DP-Adam's (proj_std 1/sqrt_r: E[PᵀP] = I), and its first Adam step (a sign-like
    map of the projected gradient) points, in expectation, along DP-Adam's first step."""
    d = dpadam_dp(0.0, 1e6, 4.0, 1e-30)
    ref = {}
    torch.manual_seed(0)  # the same dropout mask for every pass below
    orig = d.method.apply_update
    d.method.apply_update = lambda p, g, o, s: (ref.update({k: v.clone() for k, v in g.items()}), orig(p, g, o, s))
    d.step([tiny_batch(4, seed=1)], 1, noise=torch.Generator().manual_seed(0))
    d.close()

    dp = grape_dp("optim.lr=1e-30", "method.refresh=1", "method.proj_std=1/sqrt_r",
                  sigma=0.0, clip=1e6, batch=4.0)
    method = dp.method
    names = list(method.projectors)
    sums, adam_sums, errs = {n: 0.0 for n in names}, {n: 0.0 for n in names}, {}
    for k in range(1, 65):  # refresh=1: a fresh P every step; lr≈0 keeps the weights fixed
        projs = {n: Projector(**vars(method.projectors[n])) for n in names}
        torch.manual_seed(0)
        seen = update_received(dp, [tiny_batch(4, seed=1)], step=k)
        for n in names:
            sums[n] = sums[n] + seen["_back"][n]
            g = seen[n]
            adam_sums[n] = adam_sums[n] + projs[n].back(g / (g.abs() + 1e-12))  # Adam's first step: sign(Ĝ)
        if k in (8, 64):
            errs[k] = math.sqrt(sum(float((sums[n] / k - ref[n]).pow(2).sum()) for n in names)
                                / sum(float(ref[n].pow(2).sum()) for n in names))
    assert errs[64] < 0.5 * errs[8]  # Monte-Carlo error shrinks ~ 1/√K: the mean converges to DP-Adam's
    assert errs[64] < 0.35
    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    mean_adam, dp_adam_step = flat(adam_sums), flat({n: ref[n].sign() for n in names})
    cos = float(mean_adam @ dp_adam_step / (mean_adam.norm() * dp_adam_step.norm()))
    assert cos > 0.5, cos


def test_proj_std_sqrt_r_is_not_the_same_method_with_another_lr(grape_dp, tiny_batch):
    """The sweep once called proj_std=1/sqrt_r "exactly the code's method with lr·√r". With clipping
    active the flat clip sees projected and unprojected gradients together and the noise σC is the
    same for both, so scaling P by a = √r multiplies the projected layers' share of the clipped
    sum (in the privatised space, where the noise is added) by ≈ a² = r relative to the unprojected
    layers: their signal-to-noise ratios move apart by ≈ √r. An lr change leaves this ratio at 1.
    σ = 0 measures the clean sums exactly (the same batch, the same P up to its scale)."""
    r = 8
    share = {}
    for std in ("1/r", "1/sqrt_r"):
        dp = grape_dp(f"method.rank={r}", f"method.proj_std={std}", "method.refresh=1000",
                      sigma=0.0, clip=1e-4, batch=6.0)
        params, method = dp.params, dp.method
        torch.manual_seed(0)
        seen = update_received(dp, [tiny_batch(6, seed=1)])
        proj = sum(float(seen[n].pow(2).sum()) for n in method.projectors)
        rest = sum(float(seen[n].pow(2).sum()) for n in params if n not in method.projectors)
        share[std] = proj / rest
    ratio = share["1/sqrt_r"] / share["1/r"]
    # exactly r if every example's clip weight w_i = C/‖(a·p_i, u_i)‖ changed by the same factor; the
    # weights shift between examples with their projected/unprojected mix, so allow a factor 3
    assert r / 3 < ratio < 3 * r, share


# ---------------------------------------------------------------- configuration and bench


@pytest.mark.parametrize("override,expected", [
    ("method.rank=0", "method.rank must be an integer >= 1"),
    ("method.rank=2.5", "method.rank must be an integer >= 1"),
    ("method.refresh=0", "method.refresh must be an integer >= 1"),
    ("method.side=diag", "method.side must be one of"),
    ("method.proj_std=2", "method.proj_std must be one of"),
    ("method.layers.include=[]", "method.layers.include must name"),
    ("method.reset_moments=maybe", "method.reset_moments must be true or false"),
    ("optim=sgd", "needs optim=adamw"),
])
def test_bad_config_is_one_line_error(run_dirs, dpft, override, expected):
    r = dpft("train", "debug=tiny", "method=grape", override)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert run_dirs(dpft.output_dir) == []


def test_rank_that_projects_nothing_is_rejected(grape_dp):
    with pytest.raises(DpftError, match="projects no layer"):
        grape_dp("method.rank=64")  # tiny BERT's largest projected dimension is 32


def test_bench_measures_grape_side_by_side(dpft):
    r = dpft("bench", "debug=tiny", "method=grape", "--paths", "nonprivate,dpsgd-hooks,grape-hooks,grape-ghost",
             "--batch", "8", "--length", "16", "--steps", "2", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["paths"]) == {"nonprivate", "dpsgd-hooks", "grape-hooks", "grape-ghost"}
    for res in out["paths"].values():
        assert res["step_s"] > 0 and res["steps"] == 2 and res["time_ratio"] > 0
