"""A training stage (epochs, optimizer, schedule), the optimizer and per-iteration schedule it builds, and the
optimizer state a later stage may continue (:class:`OptimizerState`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Stage:
    """How one stage of training runs: epochs, optimizer and schedule.

    The schedule is stepped every iteration: ``cosine`` decays to 0 over the stage, ``multistep``
    multiplies by ``gamma`` at each epoch in ``milestones``, ``sgdr`` is cosine annealing with warm
    restarts (Loshchilov & Hutter, ICLR 2017) set once per epoch, in cycles of 1, 2, 4, ... epochs
    (T_0 = 1, T_mult = 2), from ``lr`` down to ``min_lr``, after ``warmup_epochs`` epochs at 0.1 ``lr``
    (GDumb's official schedule: ``CosineAnnealingWarmRestarts`` stepped per epoch after one warm-start epoch).
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
    min_lr: float = 0.0  # sgdr: the rate each cycle anneals towards
    warmup_epochs: int = 0  # sgdr: epochs at 0.1 lr before the first cycle

    def replace(self, **changes) -> Stage:
        """A copy with ``changes`` (an extra stage is the task's stage with a few values changed)."""
        return dataclasses.replace(self, **changes)


class OptimizerState:
    """The optimizer's per-parameter state carried from one stage into a later one (``train.keep_optimizer``).

    :meth:`keep` takes, at the end of a stage, the state of the parameters among ``params()`` (the network's);
    :meth:`restore` hands it to the next stage's new optimizer when it is of the same kind. A parameter it holds
    no state of (new since) starts fresh. The checkpoint form keys the state by the parameter's position in
    ``params()`` and holds tensors and numbers only (checkpoints load with ``weights_only``).
    """

    def __init__(self, params: Callable[[], Iterable[torch.nn.Parameter]]):
        self._params = params
        self.kind: str | None = None  # the optimizer's class the state is of (an SGD buffer is no Adam moment)
        self.state: dict[torch.Tensor, dict] = {}  # parameter -> its optimizer state (tensors hash by identity)

    def keep(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the state of ``optimizer`` (at the end of its stage), replacing what was kept before."""
        owned = set(self._params())
        self.kind = type(optimizer).__name__
        self.state = {p: dict(s) for p, s in optimizer.state.items() if p in owned and s}

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Give a new ``optimizer`` the kept state of each of its parameters that has one of the same shape."""
        if self.kind != type(optimizer).__name__:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                saved = self.state.get(p)
                if saved is not None and all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape
                                             for v in saved.values()):
                    # the optimizer updates these tensors in place; the next keep() takes them again
                    optimizer.state[p] = dict(saved)

    def state_dict(self) -> dict:
        position = {p: i for i, p in enumerate(self._params())}
        return {"kind": self.kind, "state": {position[p]: dict(s) for p, s in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """The state of :meth:`state_dict`, onto the parameters of ``params()`` at the same positions (on
        their device, as ``torch.optim.Optimizer.load_state_dict`` places them)."""
        params = list(self._params())

        def place(key: str, value, p: torch.Tensor):
            if not torch.is_tensor(value) or key == "step":  # Adam's step count stays a host scalar
                return value
            return value.to(device=p.device, dtype=p.dtype if value.is_floating_point() else value.dtype)

        self.kind = state["kind"]
        self.state = {params[i]: {k: place(k, v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}


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
    if stage.schedule == "sgdr":
        epoch = step // max(1, steps_per_epoch)
        if epoch < stage.warmup_epochs:
            return 0.1
        e = epoch - stage.warmup_epochs + 1  # cycle c runs over e in [2^c, 2^(c+1)): 1 epoch, then 2, 4, ...
        cycle = 1 << (e.bit_length() - 1)
        floor = stage.min_lr / stage.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (e - cycle) / cycle))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, step, steps_per_epoch))
