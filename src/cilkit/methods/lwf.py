"""LwF: Learning without Forgetting, in its class-incremental form (one growing head, no exemplars).

Z. Li and D. Hoiem, "Learning without Forgetting", ECCV 2016 (extended in IEEE TPAMI 40(12), 2018).
Each task trains on the new data only; the network after the previous task, frozen, is a teacher
whose old-class logits are distilled on the same batch. An optional warm-up trains the new rows
first. The first task is plain CE; prediction is the argmax over all seen logits.

    L = CE(z_{n_old+1..n_seen}(x), y - n_old) + lambda_kd * KD_T(z_{1..n_old}(x), g^{t-1}_{1..n_old}(x))

Losses, options and their sources: docs/methods/lwf.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses import kd_loss, masked_ce
from cilkit.methods.base import Method
from cilkit.schema import param


@dataclass
class LwFHyper:
    lambda_kd: float = param(1.0, ge=0)  # Li & Hoiem 2016, Sec. 3: lambda_o = 1; PyCIL models/lwf.py uses lamda = 3
    T: float = param(2.0, gt=0)  # Li & Hoiem 2016, Sec. 3: T = 2 (after Hinton et al.); PyCIL T = 2
    t2: bool = False  # no T^2 factor in Li & Hoiem's L_old nor in PyCIL's _KD_loss; Hinton et al. use one
    ce_mask: Literal["new", "all"] = "new"  # L_new over the new head only (Li & Hoiem; PyCIL); "all": every seen class
    warmup_epochs: int = param(0, ge=0)  # Li & Hoiem's warm-up of the new rows; length unspecified, PyCIL skips it [assumption]


class LwF(Method):
    name = "lwf"
    paper = "Li & Hoiem, Learning without Forgetting, ECCV 2016"
    Hyper = LwFHyper
    distills = True  # g^{t-1}: the network after the previous task
    # L_new over the new classes (ce_mask new) or every logit (all: with a fixed head, every class); L_old on the old ones
    fixed_head = True

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if hp.warmup_epochs > 0 and cfg.model.head == "fixed":
            raise ConfigError("method_args.warmup_epochs", "LwF's warm-up trains the new task's block of head rows, which "
                              "model.head: fixed does not have; use model.head: growing or warmup_epochs: 0")

    def before_task(self, task: Task) -> None:
        if self.teacher is not None and self.hp.warmup_epochs > 0:
            self.warm_up(task)

    def warm_up(self, task: Task) -> None:
        """Train only the new rows with L_new; backbone (BatchNorm included) and old rows frozen."""
        stage = self.stage(task).replace(epochs=self.hp.warmup_epochs)
        new_rows = list(self.net.head.blocks[-1].parameters())
        self.fit([{"params": new_rows}], self.train_indices(task), stage, lambda x, y: self.new_loss(self.net(x)["logits"], y),
                 train_mode=self.frozen_backbone_mode, desc="LwF warm-up")

    def new_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_new: cross-entropy over the new classes' logits (or over all seen ones)."""
        return masked_ce(logits, y, self.n_old, self.hp.ce_mask, self.task.stop)

    def old_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_old: KD_T between the student's and the teacher's old-class logits on the same batch."""
        return kd_loss(logits[:, : self.n_old], self.teacher.old_logits(x, self.n_old), self.hp.T, self.hp.t2)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)["logits"]
        loss = self.new_loss(logits, y)
        if self.teacher is not None:
            loss = loss + self.hp.lambda_kd * self.old_loss(logits, x)
        return loss
