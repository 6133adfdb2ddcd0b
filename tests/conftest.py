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


@pytest.fixture
def run_dirs():
    """run_dirs(output_dir) -> the run directories under output_dir/runs, sorted."""
    def find(output_dir: Path) -> list[Path]:
        root = Path(output_dir) / "runs"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []

    return find


@pytest.fixture
def read_run():
    """read_run(run_dir) -> (metrics records, summary, meta) as the run wrote them."""
    def read(path: Path) -> tuple[list[dict], dict, dict]:
        from dpft.store import read_metrics

        metrics = read_metrics(path / "metrics.jsonl")
        summary = json.loads((path / "summary.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
        return metrics, summary, meta

    return read


# -- one DP step on the tiny model, for the privacy tests of the engine and the methods ------------

@pytest.fixture
def tiny_dp():
    """tiny_dp(*overrides, mode, sigma, clip, batch, ...) -> a `dpft.engine.stepper.Stepper` on
    debug=tiny with `overrides`, hooks attached (removed at teardown), built as training builds
    it. `scale_head` multiplies the classifier (adversarial, huge gradients). The optimizer is
    SGD at `lr` with a constant schedule (lr=1: the update is exactly minus the privatised mean),
    or with `method_optimizer` the method's own from the config."""
    import torch

    from dpft.config import compose_run
    from dpft.engine.stepper import Stepper
    from dpft.methods import PrivacyParams, build_method
    from dpft.models import load_classifier

    built = []

    def build(*overrides, mode="hooks", sigma=1.0, clip=1.0, batch=8.0, scale_head=None, steps=1, lr=1.0,
              method_optimizer=False, device="cpu"):
        sgd = ([] if method_optimizer else
               ["optim=sgd", f"optim.lr={lr}", "optim.momentum=0.0", "optim.weight_decay=0.0"])
        spec = compose_run(["debug=tiny", f"engine.grad_sample_mode={mode}", *sgd, "train.lr_schedule=constant",
                            *overrides])
        model = load_classifier(spec.cfg.model, 2, seed=0)
        if scale_head is not None:
            with torch.no_grad():
                model.classifier.weight.mul_(scale_head)
        model.to(device)
        privacy = PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.1, expected_batch_size=batch, steps=steps,
                                delta=1e-5)
        stepper = Stepper(model, build_method(spec.cfg), spec.cfg, privacy=privacy, steps=steps).attach()
        built.append(stepper)
        return stepper

    yield build
    for stepper in built:
        stepper.close()


@pytest.fixture
def tiny_batch():
    """tiny_batch(b, t, seed, device) -> one Batch of b random sequences of t tokens, random labels."""
    def make(b=6, t=12, seed=0, device="cpu"):
        import torch

        from dpft.engine.step import Batch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 5000, (b, t), generator=g)
        labels = torch.randint(0, 2, (b,), generator=g)
        return Batch(ids.to(device), torch.ones(b, t, dtype=torch.long, device=device), labels.to(device))

    return make


@pytest.fixture
def sgd_update():
    """sgd_update(stepper, chunks, step, seed) -> {name: update} of one step whose noise is drawn
    from torch.Generator().manual_seed(seed); with tiny_dp's SGD at lr=1 the update is exactly
    minus the privatised mean gradient."""
    def update(stepper, chunks, step=1, seed=0):
        import torch

        before = {n: p.detach().clone() for n, p in stepper.params.items()}
        gen = torch.Generator(device=next(iter(stepper.params.values())).device).manual_seed(seed)
        stepper.step(chunks, step, noise=gen)
        return {n: before[n] - p.detach() for n, p in stepper.params.items()}

    return update


@pytest.fixture
def opacus_update():
    """opacus_update(mode, clip, batch_size, chunks, device) -> {name: update} of one step of
    Opacus' own make_private (dpft.bench.opacus_reference) on tiny_dp's model with σ = 0 and SGD
    at lr 1: the independent reference for dpft's clipped sum."""
    def update(mode, clip, batch_size, chunks, device="cpu"):
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

    return update
