"""BiC: bias correction of the classifier.

Y. Wu, Y. Chen, L. Wang, Y. Ye, Z. Liu, Y. Guo and Y. Fu, "Large Scale Incremental Learning",
CVPR 2019. With an exemplar memory the last layer favours the new classes. Stage 1 trains with CE
and distillation on the data minus a small validation set V balanced over all seen classes; stage 2
learns a two-parameter correction q = alpha_t o + beta_t of the new classes' logits on V alone.

    L = lambda * KD_T(q_{1..n}(x), q_hat_{1..n}(x)) + (1 - lambda) * CE(q(x), y),   lambda = n / (n + m)

Losses, options and their sources: docs/methods/bic.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.losses import kd_loss
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.training.stage import Stage

log = logging.getLogger("cilkit")


@dataclass
class BiCHyper:
    T: float = param(2.0, gt=0)  # Wu et al. 2019, distillation loss L_d: T = 2 [paper]; PyCIL T = 2
    val_ratio: float = param(0.1, gt=0, lt=1)  # Wu et al. 2019, implementation details: exemplars split train/val 9:1 [paper]; PyCIL split_ratio 0.1
    val_split: Literal["paper", "pycil"] = "paper"  # v from the exemplars held per old class, or PyCIL's 0.1*K/n
    # Stage 2's schedule; None = the task's stage-1 setting, as PyCIL (same epochs, lr, milestones, wd on
    # (alpha, beta)). The paper gives no separate schedule for stage 2 [assumption].
    stage2_epochs: int | None = param(None, ge=0)
    stage2_lr: float | None = param(None, gt=0)
    stage2_weight_decay: float | None = param(None, ge=0)
    stage2_milestones: list[int] | None = None
    stage2_double_softmax: bool = False  # True: PyCIL's CE(softmax(q), y) (a double softmax); False: CE(q, y), the paper
    # Which (alpha, beta) pairs correct the logits: the newest task's only, the older blocks raw (Wu et al.
    # 2019, Eq. 4; official code resnet.py:505-520, 561-578: raw logits in stage 1, the newest pair in the
    # teacher and at test time), or every task's pair on its own block for ever (PyCIL's bias_layers).
    bias_pairs: Literal["newest", "all"] = "newest"
    stage2_bn_train: bool = False  # True: BatchNorm in train mode during stage 2 (PyCIL calls network.train())


class BiasLayers(nn.Module):
    """One (alpha, beta) pair per task. ``pairs="newest"`` (the paper's Eq. 4, the official code) applies
    only the newest task's pair to its block of logits, every other block raw; ``"all"`` (PyCIL) applies
    every task's pair to its own block."""

    def __init__(self, pairs: str = "newest"):
        super().__init__()
        self.pairs = pairs
        self.active: int | None = None  # with "newest": the task whose pair applies (None: the last one)
        self.alpha = nn.ParameterList()
        self.beta = nn.ParameterList()
        self.sizes: list[int] = []
        # the task of every logit column (a gather index: no host-device sync in forward)
        self.register_buffer("column_task", torch.zeros(0, dtype=torch.long), persistent=False)

    def add_task(self, n_classes: int, device: torch.device | str = "cpu") -> None:
        self.alpha.append(nn.Parameter(torch.ones((), device=device)))
        self.beta.append(nn.Parameter(torch.zeros((), device=device)))
        new = torch.full((n_classes,), len(self.sizes), dtype=torch.long, device=device)
        self.column_task = torch.cat([self.column_task.to(device), new])
        self.sizes.append(n_classes)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """q = alpha_t * o + beta_t on the columns of the newest task t (or of every task t)."""
        if not self.sizes:
            return logits
        if self.pairs == "newest":
            t = len(self.sizes) - 1 if self.active is None else self.active
            start = sum(self.sizes[:t])
            stop = start + self.sizes[t]
            corrected = logits[:, start:stop] * self.alpha[t] + self.beta[t]
            return torch.cat([logits[:, :start], corrected, logits[:, stop:]], 1)
        scale = torch.stack(list(self.alpha))[self.column_task]
        shift = torch.stack(list(self.beta))[self.column_task]
        return logits * scale + shift


class BiasCorrectedNet(nn.Module):
    """The network followed by its bias layers: ``forward`` gives the corrected logits."""

    def __init__(self, net: nn.Module, bias: BiasLayers):
        super().__init__()
        self.net = net
        self.bias = bias

    def forward(self, x: torch.Tensor) -> dict:
        out = self.net(x)
        out["raw_logits"] = out["logits"]
        out["logits"] = self.bias(out["logits"])
        return out


class BiC(Method):
    name = "bic"
    paper = "Wu et al., Large Scale Incremental Learning, CVPR 2019"
    Hyper = BiCHyper
    memory_use = "required"
    distills = True  # the previous model with its bias layers: its corrected logits are the KD targets

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.bias = BiasLayers(hp.bias_pairs)
        self.model = BiasCorrectedNet(self.net, self.bias)
        self.val_idx: torch.Tensor | None = None  # V of the current task (rebuilt by before_task)

    # -- structure -------------------------------------------------------------------------------

    def grow(self, task: Task) -> None:
        super().grow(task)
        self.bias.add_task(task.n_classes, self.ctx.device)

    def distilled(self) -> nn.Module:
        return self.model

    def start_task(self, task: Task) -> None:
        """The teacher is the previous model as it predicted: its newest pair is the previous task's."""
        super().start_task(task)
        if self.teacher is not None:
            self.teacher.module.bias.active = task.index - 1

    # -- the validation split --------------------------------------------------------------------

    def val_per_class(self, task: Task) -> int:
        """v, the number of samples of every seen class that go to V (at least one)."""
        if self.hp.val_split == "paper":
            held = min(len(self.memory.exemplars[c]) for c in range(self.n_old))
            v = int(self.hp.val_ratio * held + 1e-9)
        else:
            total = self.memory.nominal_total or self.memory.quota(self.n_old) * self.n_old
            v = int(self.hp.val_ratio * total / self.n_old + 1e-9)
        return max(1, v)

    def split_validation(self, task: Task) -> torch.Tensor:
        """V: v random exemplars of each old class and v random samples of each new class."""
        pools = [self.memory.exemplars[c].cpu() for c in range(self.n_old)]
        pools += [self.ctx.train_data.indices_of([c]).cpu() for c in task.classes]
        v = min(self.val_per_class(task), min(len(p) for p in pools))  # the same count for every class
        picks = [pool[torch.randperm(len(pool))[:v]] for pool in pools]
        return torch.cat(picks).to(self.ctx.device)

    def before_task(self, task: Task) -> None:
        self.val_idx = None
        if task.index > 0:
            self.val_idx = self.split_validation(task)
            log.info("BiC: validation set of %d samples (%d a class)", len(self.val_idx), len(self.val_idx) // task.stop)

    def train_indices(self, task: Task) -> torch.Tensor:
        """(D_t U M) minus V."""
        idx = super().train_indices(task)
        if self.val_idx is None:
            return idx
        return idx[~torch.isin(idx, self.val_idx.to(idx.device))]

    def param_groups(self, task: Task) -> list[dict]:
        """Stage 1 trains the conv and FC layers; no (alpha, beta) pair is in the optimizer."""
        frozen = {id(p) for p in self.bias.parameters()}
        return [{"params": [p for p in self.net.parameters() if p.requires_grad and id(p) not in frozen]}]

    # -- stage 1 -------------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.model(x)["logits"]
        ce = F.cross_entropy(q, y)
        if self.teacher is None:
            return ce
        lam = self.task.old_fraction  # n / (n + m)
        kd = kd_loss(q[:, : self.n_old], self.teacher.old_logits(x, self.n_old), self.hp.T)
        return lam * kd + (1.0 - lam) * ce

    # -- stage 2 -------------------------------------------------------------------------------

    def stage2_mode(self) -> None:
        """Everything frozen, BatchNorm in eval mode (train mode with ``stage2_bn_train``, as PyCIL)."""
        if self.hp.stage2_bn_train:
            self.net.train()
        else:
            self.net.eval()

    def stage2_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            o = self.net(x)["logits"]
        q = self.bias(o.float())
        if self.hp.stage2_double_softmax:
            return F.cross_entropy(F.softmax(q, dim=1), y)
        return F.cross_entropy(q, y)

    def stage2_stage(self, task: Task) -> Stage:
        base = self.stage(task)
        hp = self.hp

        def pick(value, default):
            return default if value is None else value

        return base.replace(
            epochs=pick(hp.stage2_epochs, base.epochs), lr=pick(hp.stage2_lr, base.lr),
            weight_decay=pick(hp.stage2_weight_decay, base.weight_decay),
            milestones=list(pick(hp.stage2_milestones, base.milestones)),
        )

    def correct_bias(self, task: Task) -> dict:
        """Stage 2: train this task's (alpha, beta) alone on V, the rest of the model frozen."""
        t = task.index
        params = [self.bias.alpha[t], self.bias.beta[t]]
        stats = self.fit([{"params": params}], self.val_idx, self.stage2_stage(task), self.stage2_loss,
                         train_mode=self.stage2_mode, desc="BiC bias correction")
        log.info("BiC: task %d alpha %.4f beta %.4f", t + 1, params[0].item(), params[1].item())
        return stats

    def after_task(self, task: Task) -> None:
        if task.index > 0 and self.stage2_stage(task).epochs > 0:
            self.correct_bias(task)
        super().after_task(task)  # herding and class means with the model after stage 2
        self.val_idx = None

    # -- inference and state ---------------------------------------------------------------------

    def inference(self, x: torch.Tensor) -> dict:
        return self.model(x)

    def state_dict(self) -> dict:
        return {"bias": {k: v.detach().clone() for k, v in self.bias.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.bias.load_state_dict(state["bias"])
