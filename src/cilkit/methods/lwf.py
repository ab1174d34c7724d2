"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016), in its class-incremental form.

Reference: Z. Li and D. Hoiem, "Learning without Forgetting", ECCV 2016 (extended in IEEE TPAMI
40(12), 2018). The class-incremental form with one growing head is the one of the iCaRL/PyCIL
lineage (methods-spec 4.2/4.3); the original paper is task-incremental with one head per task.

No exemplars are kept. Before task t the network is frozen into a teacher g^{t-1}; on a batch of
the new task's data only (labels y in C_new, |C_old| = n_old classes seen before t),

    L = L_new + lambda * L_old

    L_new = CE( z_{n_old+1 .. n_seen}(x), y - n_old )          ce_mask = "new"   (default)
          = CE( z_{1 .. n_seen}(x), y )                        ce_mask = "all"

    L_old = KD_T( z_{1..n_old}(x), g^{t-1}_{1..n_old}(x) )
          = -(1/B) sum_x sum_{k <= n_old} softmax(g^{t-1}(x)/T)_k log softmax(z_{1..n_old}(x)/T)_k
            (times T^2 when t2 = true)

where z are the student's logits and the teacher's logits are taken on the same augmented batch,
under no_grad, over the old classes only. The first task is plain cross-entropy.

Why ce_mask = "new" is the default: in Li & Hoiem the new-task loss L_new is the cross-entropy of
the *new head's* softmax, i.e. over the new classes only, and L_old covers the old heads. With one
growing head, the faithful transcription is CE over the new-class logits plus KD over the old-class
logits, which is also what PyCIL's ``models/lwf.py`` computes. CE over all seen logits
(``ce_mask: all``) is the single-head variant in which the old rows are pushed down by the new data.

Optional warm-up (Li & Hoiem Sec. 3, "warm-up step"): before joint training, the backbone and old
rows are frozen (BatchNorm in eval mode) and only the new rows are trained with L_new for
``warmup_epochs`` epochs. The paper trains it "until convergence" without an epoch count, and PyCIL
has no warm-up, so the default is 0 [assumption].

Prediction: argmax over all seen logits (no task id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.data.scenario import Task
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
        return masked_ce(logits, y, self.n_old, self.hp.ce_mask)

    def old_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_old: KD_T between the student's and the teacher's old-class logits on the same batch."""
        return kd_loss(logits[:, : self.n_old], self.teacher.old_logits(x, self.n_old), self.hp.T, self.hp.t2)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)["logits"]
        loss = self.new_loss(logits, y)
        if self.teacher is not None:
            loss = loss + self.hp.lambda_kd * self.old_loss(logits, x)
        return loss
