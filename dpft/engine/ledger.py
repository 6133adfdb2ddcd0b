"""What a run records about itself: the privacy ledger and summary (`summary.json`'s content),
the `privacy/*` eval record, and the contents of `meta.json` and `config.yaml`. Builds contents
only; where they are written is the caller's business.

The ledger holds everything needed to re-derive the guarantee from public numbers: σ, C, q, N,
the step count, sampling, the accountant and its history, δ, ε, and ε recomputed by an
independent accountant (dp_accounting), plus the noise mode that says whether the ε is a
guarantee (secure, entropy) or a simulation (seeded).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpft import __version__
from dpft.config import RunSpec
from dpft.engine import accountant as acct
from dpft.engine import noise
from dpft.engine.evaluate import steps_to
from dpft.engine.prepare import Prepared

log = logging.getLogger("dpft")


def privacy_record(method, privacy, eps) -> dict:
    """The public `privacy/*` numbers logged with every evaluation."""
    if privacy is None:
        return {"privacy/epsilon": float("inf")}
    return {"privacy/epsilon": eps, "privacy/sigma": method.noise_multiplier(), "privacy/clip_norm": privacy.clip_norm,
            "privacy/sample_rate": privacy.sample_rate}


def summary(cfg, prep: Prepared, method, evals, primary, wall, accountant, source=None) -> dict:
    final = evals[-1] if evals else {}
    best = max((e[primary] for e in evals if e.get(primary) is not None), default=None)
    target = cfg.task.get("target")
    out = {
        "run_id": prep.spec.run_id,
        "slug": prep.spec.slug,
        "method": method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "metric": primary,
        "final": final.get(primary),
        "best": best,
        "final_metrics": {k: v for k, v in final.items() if k != "step"},
        "target": target,
        "steps": prep.steps,
        "wall_time_s": wall,
    }
    for pct in (90, 95):
        out[f"steps_to_{pct}"] = (steps_to(evals, primary, pct / 100 * float(target))
                                  if target is not None else None)
    out["privacy"] = ledger(cfg, prep, method, accountant, source)
    out["epsilon"] = out["privacy"]["epsilon"]
    return out


def ledger(cfg, prep: Prepared, method, accountant: acct.Accountant | None, source=None) -> dict:
    """Everything needed to re-derive the guarantee: σ, C, q, steps, sampling, accountant, δ, ε —
    and ε recomputed by an independent accountant (dp_accounting) — and the noise mode that says
    whether it is a guarantee (secure, entropy) or a simulation (seeded)."""
    if not method.private:
        return {"private": False, "epsilon": float("inf"), "sampling": "shuffle",
                "guarantee": "none: non-private training"}
    eps = accountant.epsilon(prep.delta)
    history = accountant.history
    try:
        eps_ind = acct.independent_epsilon(history, prep.delta, cfg.privacy.accountant)
    except Exception as e:  # never lose a finished run to the cross-check
        log.warning("independent accountant failed: %s", e)
        eps_ind = None
    disagree = None if eps_ind is None or eps == 0 else abs(eps - eps_ind) / eps
    return {
        "private": True,
        "epsilon": eps,
        "epsilon_target": None if cfg.privacy.noise_multiplier is not None else float(cfg.privacy.epsilon),
        "delta": prep.delta,
        "sigma": method.noise_multiplier(),
        "clip_norm": float(cfg.privacy.clip_norm),
        "sensitivity": method.sensitivity(),
        "sample_rate": prep.sample_rate,
        "expected_batch_size": prep.sample_rate * prep.public_n(),
        "dataset_size": prep.public_n(),
        "steps": sum(int(h[2]) for h in history),
        "sampling": "poisson",
        "accountant": cfg.privacy.accountant,
        "history": [list(h) for h in history],
        "epsilon_independent": eps_ind,
        "independent_accountant": "dp_accounting." + ("rdp" if cfg.privacy.accountant == "rdp" else "pld"),
        "accountants_disagree": None if disagree is None else bool(disagree > 0.01),
        "noise": source.mode if source is not None else None,
        "guarantee": noise.GUARANTEE[source.mode] if source is not None else None,
        "simulation": bool(source is not None and source.reproducible),
        "public": "N (dataset size), q = B/N, δ, σ, C and the step count are public; the noise key is not "
                  "(dpft/engine/noise.py)",
    }


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def _versions() -> dict:
    import importlib.metadata as md

    out = {"dpft": __version__, "python": platform.python_version()}
    for pkg in ("torch", "opacus", "transformers", "hydra-core", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def meta(prep: Prepared, status: str, **extra) -> dict:
    dev = prep.device
    return {
        "run_id": prep.spec.run_id,
        "slug": prep.spec.slug,
        "status": status,
        "versions": _versions(),
        "git_sha": _git_sha(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "pid": os.getpid(),
        "argv": sys.argv,
        "data_source": prep.data.source,
        "time_start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def config_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(spec.cfg, resolve=True)
