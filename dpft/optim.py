"""Optimizer and learning-rate schedule from the `optim` config group and `train.lr_schedule`.
Below the methods (which build their optimizers from it) and the engine; `check_optimizer` and
`check_schedule` are the one check of each name, run by config validation before anything is written."""

from __future__ import annotations

from dpft.errors import DpftError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup"}  # train.lr_schedule -> transformers'


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise DpftError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
    return name


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise DpftError(f"train.lr_schedule must be linear or constant, got {name!r}")
    return name


def build_optimizer(params, optim_cfg):
    import torch

    if check_optimizer(optim_cfg.name) == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay)


def build_schedule(optimizer, train_cfg, steps: int):
    from transformers import get_scheduler

    name = SCHEDULES[check_schedule(train_cfg.lr_schedule)]
    return get_scheduler(name, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=steps)
