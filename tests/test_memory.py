"""dpft/engine/memory.py: the Stepper keeps freed CPU memory for the next step (glibc), once per process,
with an opt-out."""

from __future__ import annotations

import platform

import pytest

from dpft.engine import memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_done", [])
    return memory


def test_opt_out_keeps_the_defaults(fresh, monkeypatch):
    monkeypatch.setenv("DPFT_RETAIN_FREED_MEMORY", "0")
    calls = []
    monkeypatch.setattr("ctypes.CDLL", lambda name: calls.append(name))
    assert fresh.retain_freed_memory() is False and calls == []


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_settings_once(fresh, monkeypatch):
    monkeypatch.delenv("DPFT_RETAIN_FREED_MEMORY", raising=False)
    assert fresh.retain_freed_memory() is True
    monkeypatch.setattr("ctypes.CDLL", lambda name: pytest.fail("set twice"))
    assert fresh.retain_freed_memory() is True


def test_the_stepper_sets_it(fresh, tiny_dp):
    assert fresh._done == []
    tiny_dp(mode="bk", sigma=0.0, clip=1.0, batch=1.0)
    assert fresh._done  # the Stepper asked for it before its first step
