"""Crash-safe checkpoints that carry the privacy ledger.

A checkpoint is taken at a step boundary (every `train.checkpoint_every` steps and when SIGTERM or
SIGINT arrives) and holds everything the next step depends on: trainable weights, optimizer,
schedule, method state (e.g. momentum), the global torch RNG (dropout: non-private randomness),
the accountant history, the step, the eval records and a fingerprint of the encoded training set.

Privacy notes. The mechanism's key (dpft/engine/noise.py) is never in a checkpoint: a seeded run
re-derives it from the config and replays the same batches and noise; a secure run draws a fresh
key, and the engine charges the accountant for every step after the checkpoint that may already
have been released (logged) before the crash, so the ledger never undercounts. A resume on other
training data (fingerprint mismatch) is refused: with replayed noise the difference of the two
releases would be the clipped signal with no noise left. Checkpoints hold the private model state
and are written owner-only (0600). Loading uses ``torch.load(weights_only=True)``; a checkpoint
from another config or dpft version is refused whole, never half-loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dpft import __version__
from dpft.errors import DpftError

FORMAT = 1


def save(path: Path, state: dict) -> None:
    """torch.save to an owner-only temp file in the same directory, fsync, rename: never a torn
    checkpoint, never readable by other users."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)  # private artefact, whatever the umask (mkstemp's 0600 is not a contract)
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


def check_data(state: dict, fingerprint: str, path: Path) -> None:
    """Refuse to resume on training data other than the data the checkpoint was trained on."""
    if state.get("data_fingerprint") != fingerprint:
        raise DpftError(f"checkpoint {path} was trained on other training data (fingerprint mismatch); "
                        "resuming would re-release steps on changed data. Re-run with --restart to start over")
