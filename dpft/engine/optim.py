"""Optimizer and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

import torch


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    from dpft.errors import DpftError

    raise DpftError(f"unknown optimizer '{optim_cfg.name}'; valid choices: adamw, sgd")


def build_schedule(optimizer, train_cfg, steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "constant": "constant_with_warmup"}.get(train_cfg.lr_schedule)
    if name is None:
        from dpft.errors import DpftError

        raise DpftError(f"train.lr_schedule must be linear or constant, got {train_cfg.lr_schedule!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=steps)
