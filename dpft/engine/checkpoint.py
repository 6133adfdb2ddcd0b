"""Crash-safe checkpoints that carry the privacy ledger.

A checkpoint is taken at a step boundary (every `train.checkpoint_every` steps and when SIGTERM or
SIGINT arrives) and holds everything the next step depends on: trainable weights, optimizer,
schedule, method state (e.g. momentum), every RNG (global torch, Poisson sampler, noise), the
accountant history, the step, and the eval records. A resumed run therefore draws the same batches
and the same noise as an uninterrupted one and ends with the same accountant history and ε.

Privacy note: steps computed after the last checkpoint and lost in a crash are recomputed from the
same state and randomness, so they release exactly what the uninterrupted run releases; no step
is accounted twice or skipped. Loading uses ``torch.load(weights_only=True)``; a checkpoint from
another config or dpft version is refused whole, never half-loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dpft import __version__
from dpft.errors import DpftError

FORMAT = 1
NAME = "checkpoint.pt"


def save(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same directory, fsync, rename: never a torn checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "dpft_version": __version__, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path, run_id: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DpftError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                        "re-run with --force to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DpftError(f"checkpoint {path} has an unknown format; re-run with --force to start over")
    if state.get("run_id") != run_id:
        raise DpftError(f"checkpoint {path} belongs to run {state.get('run_id')}, not {run_id}")
    if state.get("dpft_version") != __version__:
        raise DpftError(f"checkpoint {path} was written by dpft {state.get('dpft_version')}, this is {__version__}; "
                        "re-run with --force to start over")
    return state


class ShuffleBatches:
    """Fixed-size shuffled batches for the non-private baseline, with a resumable position."""

    def __init__(self, n: int, bs: int, seed: int):
        self.n, self.bs = n, bs
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def __next__(self) -> list[int]:
        if self.pos + self.bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.perm[self.pos:self.pos + self.bs].tolist()
        self.pos += self.bs
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.perm, self.pos = s["perm"], int(s["pos"])


class PoissonBatches:
    """Poisson sampling (each example joins with probability q, independently) through Opacus'
    UniformWithReplacementSampler; its only state is the generator, which we save and restore."""

    def __init__(self, n: int, q: float, steps: int, seed: int):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.gen = torch.Generator().manual_seed(seed)
        self._make = lambda remaining: iter(UniformWithReplacementSampler(  # noqa: E731
            num_samples=n, sample_rate=q, generator=self.gen, steps=remaining))
        self.steps = steps
        self._it = self._make(steps)

    def __next__(self) -> list[int]:
        return next(self._it)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, s: dict, done: int) -> None:
        self.gen.set_state(s["gen"])
        self._it = self._make(self.steps - done)
