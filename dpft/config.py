"""Compose, validate and identify run configs. The only module that imports Hydra.

`compose_run(overrides)` turns CLI overrides into a resolved, validated `RunSpec` whose `run_id`
is a hash of the semantic part of the config: two runs with the same id compute the same thing,
so re-running a finished id is skipped unless forced.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpft.errors import DpftError

CONF_DIR = Path(__file__).resolve().parent / "conf"

# Keys that never change what a run computes: where it logs, which device, how it batches in memory.
GRAD_SAMPLE_MODES = ("hooks", "ghost", "bk")  # dpft/engine/step.py: materialised, ghost norms, book-keeping
NON_SEMANTIC_KEYS = ("logger", "paths", "runtime", "launcher", "nproc")
GROUPS = ("method", "model", "task", "privacy", "optim", "logger", "debug")


@dataclass
class RunSpec:
    cfg: DictConfig
    overrides: list[str]
    run_id: str
    slug: str
    choices: dict[str, Any] = field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _compose(overrides: list[str], config_name: str = "config") -> tuple[DictConfig, dict]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except MissingConfigException as e:
        raise DpftError(_missing_config_message(e)) from None
    except OverrideParseException as e:
        raise DpftError(f"malformed override: {_one_line(e)}{_quoting_hint(overrides)}") from None
    except ConfigCompositionException as e:
        msg = _one_line(e)
        cause = e.__cause__
        if cause is not None and "Could not override" in msg:
            msg = f"{msg.split('.')[0]}: {_one_line(cause).split('full_key')[0].strip()}"
        raise DpftError(f"bad override: {msg}") from None
    except (OmegaConfBaseException, ValueError) as e:
        raise DpftError(f"bad config: {_one_line(e).split('full_key')[0].strip()}") from None
    choices = dict(cfg.hydra.runtime.choices)
    choices = {k: v for k, v in choices.items() if not k.startswith("hydra")}
    with_hydra = cfg
    OmegaConf.set_struct(with_hydra, False)
    del with_hydra["hydra"]
    return with_hydra, choices


_UNQUOTED_OK = re.compile(r"[A-Za-z0-9_./\\:\-+*@%,~ \[\]{}$]*")


def _quoting_hint(overrides: list[str]) -> str:
    """Hydra's override grammar takes only some characters unquoted; a path with non-ASCII letters,
    parentheses, quotes, '=' ... must be quoted *for Hydra*, inside the shell's quotes."""
    for tok in overrides:
        key, eq, value = tok.partition("=")
        if eq and value and value[0] not in "'\"" and not _UNQUOTED_OK.fullmatch(value):
            return (f" (a value with non-ASCII or special characters needs Hydra quotes inside the shell's: "
                    f"\"{key}='{value}'\")")
    return ""


def _missing_config_message(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Could not find '([^']+)'", text)
    missing = m.group(1) if m else None
    # Hydra lists the options, then its search path (provider=..., path=...): keep the options
    options = [line.strip() for line in text.splitlines()
               if line.startswith("\t") and "provider=" not in line and "path=" not in line]
    if missing and "/" in missing:
        group, name = missing.rsplit("/", 1)
        group = group.lstrip("/")
        if not options:
            options = list_choices(group)
        return f"unknown {group} '{name}'; valid choices: {', '.join(sorted(options))}"
    return f"config not found: {_one_line(text)}"


def list_choices(group: str) -> list[str]:
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def semantic_config(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in NON_SEMANTIC_KEYS}


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(semantic_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_slug(cfg: DictConfig) -> str:
    """method-model-task-<privacy>-s<seed>. <privacy> is eps<target ε>, or sigma<σ> when σ is set by
    hand (privacy.noise_multiplier): ε is then whatever that σ spends, not privacy.epsilon."""
    if not cfg.method.private:
        priv = "epsinf"
    elif cfg.privacy.get("noise_multiplier") is not None:
        priv = f"sigma{cfg.privacy.noise_multiplier}"
    else:
        priv = f"eps{cfg.privacy.epsilon}"
    return f"{cfg.method.name}-{cfg.model.name}-{cfg.task.name}-{priv}-s{cfg.seed}"


def compose_run(overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Compose `conf/config.yaml` with Hydra overrides, resolve, validate, identify."""
    overrides = [str(o) for o in overrides]
    for tok in overrides:
        if tok.startswith("-"):
            raise DpftError(f"unknown option '{tok}'; Hydra overrides look like key=value, +key=value, ~key")
        if "=" not in tok and not tok.startswith("~"):
            raise DpftError(f"malformed override '{tok}': expected key=value, +key=value or ~key")
    cfg, choices = _compose(overrides)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # interpolation errors are config errors
        raise DpftError(f"bad config: {_one_line(e).split('full_key')[0].strip()}") from None
    validate(cfg)
    _resolve_substitutions(cfg)
    OmegaConf.set_readonly(cfg, True)
    return RunSpec(cfg=cfg, overrides=overrides, run_id=config_hash(cfg), slug=make_slug(cfg), choices=choices)


def _num(cfg: DictConfig, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise DpftError(f"{key} must be a number, got {value!r}") from None


def grad_sample_refusal(cfg: DictConfig, method=None) -> str | None:
    """Why DP training refuses `engine.grad_sample_mode` with this config (and `method`, once
    built), or None. The one place for these rules: config validation, the stepper and the bench
    all ask here."""
    mode = cfg.engine.grad_sample_mode
    if method is not None and mode in ("ghost", "bk") and not method.supports_ghost:
        return f"method {method.name} does not support ghost clipping; use engine.grad_sample_mode=hooks"
    # half precision with ghost clipping: the second backward recomputes every example's gradient
    # in half precision, so the first backward's norms do not bound it (bk and hooks sum the very
    # values whose norms were taken, in fp32: exact; dpft/engine/bookkeeping.py)
    half = ("engine.autocast=bf16" if cfg.engine.get("autocast") == "bf16" else
            f"model.dtype={OmegaConf.select(cfg, 'model.dtype')}"
            if OmegaConf.select(cfg, "model.dtype") in ("bfloat16", "float16") else None)
    if half and mode == "ghost":
        return (f"{half} needs engine.grad_sample_mode=bk or hooks: ghost clipping's second "
                "backward recomputes the gradients in half precision, so its clip factors would not be exact")
    return None


def validate(cfg: DictConfig) -> None:
    """Reject configs that cannot run or would silently mean something else. Data-dependent checks
    (batch vs dataset size) happen in the engine before anything is written."""
    for key in ("method", "model", "task", "privacy", "optim", "train", "engine", "runtime"):
        if key not in cfg:
            raise DpftError(f"config is missing the '{key}' section")
    if cfg.method.private:
        eps = _num(cfg, "privacy.epsilon")
        sigma = _num(cfg, "privacy.noise_multiplier")
        if sigma is None and (eps is None or not eps > 0):
            raise DpftError(f"privacy.epsilon must be > 0, got {cfg.privacy.epsilon}")
        if sigma is not None and not sigma > 0:
            raise DpftError(f"privacy.noise_multiplier must be > 0, got {sigma}")
        delta = _num(cfg, "privacy.delta")
        if delta is not None and not 0 < delta < 1:
            raise DpftError(f"privacy.delta must be in (0, 1), got {delta}")
        c = _num(cfg, "privacy.clip_norm")
        if c is None or not c > 0:
            raise DpftError(f"privacy.clip_norm (C) must be > 0, got {cfg.privacy.clip_norm}")
        if cfg.privacy.accountant not in ("rdp", "prv"):
            raise DpftError(f"privacy.accountant must be rdp or prv, got {cfg.privacy.accountant!r}")
        if cfg.privacy.sampling != "poisson":
            raise DpftError(
                f"privacy.sampling={cfg.privacy.sampling!r}: the accountants assume Poisson sampling, "
                "which is the only scheme dpft trains DP methods with"
            )
        if cfg.engine.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise DpftError(f"engine.grad_sample_mode must be hooks, ghost or bk, got {cfg.engine.grad_sample_mode!r}")
        refused = grad_sample_refusal(cfg)
        if refused:
            raise DpftError(refused)
    if cfg.engine.get("autocast") not in (None, "bf16"):
        raise DpftError(f"engine.autocast must be null or bf16, got {cfg.engine.get('autocast')!r}")
    for key in ("train.steps", "train.batch_size", "train.eval_every", "runtime.physical_batch_size"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float):  # int(2.5) would silently run 2
            raise DpftError(f"{key} must be an integer, got {value!r}")
    steps, epochs = _num(cfg, "train.steps", int), _num(cfg, "train.epochs")
    if steps is None and epochs is None:
        raise DpftError("set train.steps or train.epochs")
    if steps is not None and steps < 1:
        raise DpftError(f"train.steps must be >= 1, got {steps}")
    if epochs is not None and steps is None and not epochs > 0:
        raise DpftError(f"train.epochs must be > 0, got {epochs}")
    bs = _num(cfg, "train.batch_size", int)
    if bs is None or bs < 1:
        raise DpftError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    pbs = _num(cfg, "runtime.physical_batch_size", int)
    if pbs is None or pbs < 1:
        raise DpftError(f"runtime.physical_batch_size must be >= 1, got {cfg.runtime.physical_batch_size}")
    lr = _num(cfg, "optim.lr")
    if lr is None or not lr > 0:
        raise DpftError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if _num(cfg, "train.eval_every", int) is not None and cfg.train.eval_every < 1:
        raise DpftError("train.eval_every must be >= 1 (or null to evaluate only at the end)")
    target = _num(cfg, "task.target")
    if target is not None and not target > 0:
        raise DpftError(f"task.target must be > 0, got {target}")
    _validate_ints_and_choices(cfg)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_ints_and_choices(cfg: DictConfig) -> None:
    """Values that used to crash deep in the engine (int('abc')) or silently meant something else
    (checkpoint_every=-1 checkpointed every step)."""
    if not _is_int(OmegaConf.select(cfg, "seed")):
        raise DpftError(f"seed must be an integer, got {OmegaConf.select(cfg, 'seed')!r}")
    for key, low in (("task.max_length", 1), ("train.warmup_steps", 0), ("train.log_every", 1),
                     ("runtime.num_threads", 1), ("runtime.checkpoint_every", 1), ("runtime.eval_batch_size", 1)):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (_is_int(value) and value >= low):
            raise DpftError(f"{key} must be an integer >= {low}" + (" or null" if key.startswith("runtime.") else "")
                            + f", got {value!r}")
    eval_at = OmegaConf.select(cfg, "train.eval_at")
    if eval_at is not None and not (OmegaConf.is_list(eval_at) and all(_is_int(s) and s >= 1 for s in eval_at)):
        raise DpftError(f"train.eval_at must be a list of steps >= 1, e.g. [50,100], got {eval_at}")
    progress = OmegaConf.select(cfg, "runtime.progress")
    if progress is not None and progress not in ("auto", "rich", "plain", "none"):
        raise DpftError(f"runtime.progress must be auto, rich, plain or none, got {progress!r}")
    from dpft.optim import check_optimizer, check_schedule

    check_optimizer(OmegaConf.select(cfg, "optim.name"))
    check_schedule(OmegaConf.select(cfg, "train.lr_schedule"))
    dtype = OmegaConf.select(cfg, "model.dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise DpftError(f"model.dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")


_WARNED: set = set()


def _resolve_substitutions(cfg: DictConfig) -> None:
    """Make every stand-in part of the resolved config, hence of config.yaml and the run id.

    A random-init model (model.pretrained=false) whose tokenizer is a hub id that cannot be had
    here (offline and not in the local cache) runs with the packaged MiniLM tokenizer; the
    tokenizer is then recorded as that package, so such a run never shares an id with one that
    used the real tokenizer."""
    import logging

    from dpft import hub

    model = cfg.get("model")
    if model is None or model.get("pretrained", True):
        return
    name = model.get("tokenizer") or model.get("name_or_path")
    if name is None:
        return
    if hub.hub_available(str(name), ("tokenizer_config.json", "tokenizer.json")) is False:
        if name not in _WARNED:
            _WARNED.add(name)
            logging.getLogger("dpft").warning(
                "tokenizer %s is not available offline; this random-init run uses the packaged MiniLM tokenizer, "
                "recorded as model.tokenizer=%s (so in config.yaml and the run id)", name, hub.FALLBACK_TOKENIZER)
        OmegaConf.update(cfg, "model.tokenizer", hub.FALLBACK_TOKENIZER, force_add=True)
