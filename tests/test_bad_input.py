"""Bad input: exit 2, one clear line, no traceback, nothing written to the store.

``CASES`` maps a case name to (overrides, expected): the command is always
``dpft train debug=tiny <overrides>`` in an empty store, and ``expected`` is a substring of the one
``error: ...`` line it must print. Broken files, hand-edited run directories and the other
commands are in tests/test_hostile.py."""

from __future__ import annotations

import pytest


CASES = {
    "unknown method": (["method=nope"], "unknown method 'nope'; valid choices:"),
    "unknown model": (["model=gpt9"], "unknown model 'gpt9'"),
    "unknown task": (["task=squad"], "unknown task 'squad'"),
    "epsilon zero": (["privacy.epsilon=0"], "privacy.epsilon must be > 0"),
    "epsilon negative": (["privacy.epsilon=-1"], "privacy.epsilon must be > 0"),
    "epsilon not a number": (["privacy.epsilon=abc"], "privacy.epsilon must be a number"),
    "delta one": (["privacy.delta=1"], "privacy.delta must be in (0, 1)"),
    "delta zero": (["privacy.delta=0"], "privacy.delta must be in (0, 1)"),
    "clip zero": (["privacy.clip_norm=0"], "privacy.clip_norm (C) must be > 0"),
    "bad accountant": (["privacy.accountant=gdp"], "privacy.accountant must be rdp or prv"),
    "non-poisson sampling": (["privacy.sampling=shuffle"], "Poisson"),
    "batch larger than data": (["train.batch_size=100000"], "larger than the training set"),
    "missing data dir": (["task=sst2", "task.data_dir=/no/such/dir"], "does not exist"),
    "malformed override": (["privacy.epsilon"], "malformed override"),
    "bad override syntax": (["privacy.epsilon=[1,"], "malformed override"),
    "unknown key": (["privacy.epsilonn=3"], "bad override"),
    "bad grad sample mode": (["engine.grad_sample_mode=magic"], "grad_sample_mode"),
    "method without ghost/bk support": (["method=anadp", "engine.grad_sample_mode=bk"],
                                        "method anadp does not support ghost clipping"),
    "epsilon ceiling": (["privacy.noise_multiplier=0.3", "privacy.max_epsilon=8"], "privacy.max_epsilon=8"),
    "hub model offline": (["model=roberta-base"], "not available offline"),
    "hub task offline": (["task=sst2"], "task.data_dir"),
    "fractional steps": (["train.steps=2.5"], "train.steps must be an integer, got 2.5"),
    "fractional batch": (["train.batch_size=32.5"], "train.batch_size must be an integer"),
    "non-ASCII path unquoted": (["paths.output_dir=/tmp/résumé"], "needs Hydra quotes inside the shell's: "
                                "\"paths.output_dir='/tmp/résumé'\""),
    "force and resume": (["--force", "--resume"], "pick one"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(run_dirs, dpft, name):
    args, expected = CASES[name]
    r = dpft("train", "debug=tiny", *args)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert run_dirs(dpft.output_dir) == []


def test_unknown_flag_is_rejected_not_passed_to_hydra(run_dirs, dpft):
    r = dpft("train", "--epsilon", "3")
    assert r.exit_code == 2
    assert "No such option" in r.stderr and "Traceback" not in r.stderr
    assert run_dirs(dpft.output_dir) == []
