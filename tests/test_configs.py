"""Every shipped config composes, opens with the command that uses it, and ids are stable."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpft.config import CONF_DIR, GROUPS, compose_run, list_choices

OPTIONS = [(g, o) for g in GROUPS for o in list_choices(g)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    spec = compose_run([f"{group}={option}"])
    assert spec.run_id and len(spec.run_id) == 12
    assert spec.choices[group] == option
    if group in ("method", "model", "task", "optim"):
        assert spec.cfg[group].name == option


@pytest.mark.parametrize("path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_config_opens_with_its_command(path: Path):
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
    assert lines[0].startswith("# dpft "), f"{path} must open with the command that uses it"


def test_run_id_ignores_non_semantic_keys_only():
    base = compose_run([])
    assert compose_run(["logger=none", "runtime.physical_batch_size=8", "paths.output_dir=/x"]).run_id == base.run_id
    assert compose_run(["seed=1"]).run_id != base.run_id
    assert compose_run(["privacy.epsilon=3"]).run_id != base.run_id


def test_overrides_grammar():
    spec = compose_run(["+extra.knob=3", "~train.eval_at", "method=nonprivate", "task=sst2"])
    assert spec.cfg.extra.knob == 3 and "eval_at" not in spec.cfg.train
    assert spec.cfg.method.name == "nonprivate" and spec.cfg.task.hub.name == "sst2"
    # delta configs inherit: qnli keeps sst2's hub path but its own pair fields
    q = compose_run(["task=qnli"]).cfg.task
    assert q.hub.path == "nyu-mll/glue" and list(q.text_fields) == ["question", "sentence"]
    assert compose_run(["model=roberta-large"]).cfg.model.arch.hidden_size == 1024
