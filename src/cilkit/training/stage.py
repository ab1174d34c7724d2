"""A training stage (epochs, optimizer, schedule) and the optimizer and per-iteration schedule it builds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch


@dataclass
class Stage:
    """How one stage of training runs: epochs, optimizer and schedule.

    The schedule is stepped every iteration: ``cosine`` decays to 0 over the stage, ``multistep``
    multiplies by ``gamma`` at each epoch in ``milestones``.
    """

    epochs: int
    lr: float
    weight_decay: float = 5e-4
    momentum: float = 0.9
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    batch_size: int = 128
    augment: bool = True

    def replace(self, **changes) -> Stage:
        """A copy with ``changes`` (an extra stage is the task's stage with a few values changed)."""
        return dataclasses.replace(self, **changes)


def build_optimizer(groups: list[dict], stage: Stage) -> torch.optim.Optimizer:
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    if stage.optimizer == "adam":
        return torch.optim.Adam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)


def lr_factor(stage: Stage, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at iteration ``step`` of the stage."""
    if stage.schedule == "cosine":
        total = max(1, stage.epochs * steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if stage.schedule == "multistep":
        epoch = step // max(1, steps_per_epoch)
        return stage.gamma ** sum(epoch >= m for m in stage.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, step, steps_per_epoch))
