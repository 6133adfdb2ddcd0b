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
