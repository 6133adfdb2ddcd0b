"""Shared test fixtures: offline, no W&B server, every run in a temp store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: thread start-up costs more than it buys, and CI has 2 shared cores. Subprocesses
# (resume, local sweep executor) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception


@pytest.fixture
def dpft(tmp_path):
    """Run the real CLI in-process: dpft(*args) -> result with exit_code/stdout/stderr.
    `paths.output_dir` defaults to a temp store unless the call sets it."""
    from typer.testing import CliRunner

    from dpft.cli import app

    runner = CliRunner()
    out = tmp_path / "outputs"

    def call(*args: str, output_dir: Path | None = None):
        args = list(args)
        if args and args[0] in ("train", "show") and not any(a.startswith("paths.output_dir=") for a in args):
            args.append(f"paths.output_dir={output_dir or out}")
        return CliResult(runner.invoke(app, args, catch_exceptions=True))

    call.output_dir = out
    return call


def run_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "runs"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def read_run(path: Path) -> tuple[list[dict], dict, dict]:
    from dpft.store import read_metrics

    metrics = read_metrics(path / "metrics.jsonl")
    summary = json.loads((path / "summary.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    return metrics, summary, meta


# -- one DP step on the tiny model, for the privacy tests of the engine and the methods ------------

def tiny_dp(*overrides, mode="hooks", sigma=1.0, clip=1.0, batch=8.0, scale_head=None, steps=1, lr=1.0,
            method_optimizer=False, device="cpu"):
    """(model, params, method, hooks, optimizer) for `dp_step` on debug=tiny with `overrides`.
    `scale_head` multiplies the classifier (adversarial, huge gradients). The optimizer is SGD with
    `lr` (lr=1: the update is exactly minus the privatised mean), or the method's own."""
    import torch

    from dpft.config import compose_run
    from dpft.engine.train import attach_hooks
    from dpft.methods import PrivacyParams, build_method
    from dpft.models import load_classifier

    spec = compose_run(["debug=tiny", f"engine.grad_sample_mode={mode}", *overrides])
    model = load_classifier(spec.cfg.model, 2, seed=0)
    if scale_head is not None:
        with torch.no_grad():
            model.classifier.weight.mul_(scale_head)
    model.to(device).train()
    method = build_method(spec.cfg)
    model = method.prepare_model(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    method.setup(model, params, PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.1,
                                              expected_batch_size=batch, steps=steps, delta=1e-5))
    hooks = attach_hooks(model, mode, clip)
    opt = (method.build_optimizer(params, spec.cfg.optim) if method_optimizer
           else torch.optim.SGD(list(params.values()), lr=lr))
    return model, params, method, hooks, opt


def tiny_batch(b=6, t=12, seed=0, device="cpu"):
    import torch

    from dpft.engine.step import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (b, t), generator=g)
    labels = torch.randint(0, 2, (b,), generator=g)
    return Batch(ids.to(device), torch.ones(b, t, dtype=torch.long, device=device), labels.to(device))


def sgd_update(model, params, method, hooks, opt, chunks, mode, step=1, seed=0):
    """One dp_step; with SGD at lr=1 the returned update is exactly minus the privatised mean gradient."""
    import torch

    from dpft.engine.step import dp_step

    before = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    dp_step(model=model, chunks=chunks, method=method, params=params, optimizer=opt,
            noise_generator=gen, mode=mode, hooks=hooks, step=step, alignment=False)
    return {n: before[n] - p.detach() for n, p in params.items()}


def opacus_update(mode, clip, batch_size, chunks, device="cpu"):
    """One step of Opacus' own make_private (dpft.bench.opacus_reference) on tiny_dp's model with
    σ = 0 and SGD at lr 1 -> {name: update}, the independent reference for dpft's clipped sum."""
    import torch

    from dpft.bench import opacus_reference
    from dpft.config import compose_run
    from dpft.models import load_classifier

    ref = load_classifier(compose_run(["debug=tiny"]).cfg.model, 2, seed=0).to(device).train()  # tiny_dp's model
    before = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    sgd = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1.0)
    _, _, step = opacus_reference(ref, mode, clip, sgd, batch_size, chunks, noise_multiplier=0.0)
    step()
    return {n: before[n] - p.detach() for n, p in ref.named_parameters() if p.requires_grad}
