"""iCaRL: Incremental Classifier and Representation Learning.

S.-A. Rebuffi, A. Kolesnikov, G. Sperl and C. H. Lampert, "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017. A herding exemplar memory under a fixed total budget; training
on the new data plus the exemplars with a sigmoid BCE whose old-class targets are the previous
model's outputs; classification by the nearest mean of exemplars (NME, computed by the task driver:
iCaRL's headline accuracy). ``loss: softmax_kd`` is PyCIL's CE + KD variant.

    L = mean_{x, y<=n_seen} BCE( sigma(g_y(x)), target_y ),  target_y = sigma(g^{t-1}_y(x)) (old y), [y = y_i] (new y)

Losses, options and their sources: docs/methods/icarl.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.losses import kd_loss
from cilkit.methods.base import Method
from cilkit.schema import param


@dataclass
class ICaRLHyper:
    loss: Literal["bce", "softmax_kd"] = "bce"  # Rebuffi et al. 2017, Alg. 3 (sigmoid BCE); "softmax_kd": PyCIL
    T: float = param(2.0, gt=0)  # temperature of the softmax_kd variant only (PyCIL models/icarl.py, T = 2)


def bce_targets(y: torch.Tensor, n_seen: int, old_logits: torch.Tensor | None) -> torch.Tensor:
    """iCaRL's targets: sigma(teacher logits) on the old columns, one-hot of the label on the new ones.

    ``old_logits`` (B x n_old) are the teacher's logits over the old classes, or None on the first task.
    A sample whose label is an old class (an exemplar) has all-zero new columns.
    """
    target = F.one_hot(y, n_seen).float()
    if old_logits is not None and old_logits.shape[1] > 0:
        target[:, : old_logits.shape[1]] = torch.sigmoid(old_logits.detach().float())
    return target


class ICaRL(Method):
    name = "icarl"
    paper = "Rebuffi, Kolesnikov, Sperl & Lampert, iCaRL: Incremental Classifier and Representation Learning, CVPR 2017"
    Hyper = ICaRLHyper
    memory_use = "required"
    # a stream memory (reservoir, balanced) works too: its exemplars are used as a task-end memory's
    selections = ("herding", "random", "reservoir", "balanced")
    # g^{t-1}, the network after the previous task; its outputs on the same augmented batch are
    # equivalent to storing q_y(x) before training (Alg. 3)
    distills = True
    # the BCE spans every logit: with a fixed head the unseen classes' columns have target 0 (Mammoth's
    # icarl: its one-hot targets over all the classes, the teacher's sigmoids on the old ones)
    fixed_head = True

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits over the old classes only (None on the first task)."""
        return None if self.teacher is None else self.teacher.old_logits(x, self.n_old).float()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)["logits"].float()
        old = self.teacher_logits(x)
        if self.hp.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, bce_targets(y, logits.shape[1], old))
        loss = F.cross_entropy(logits, y)
        if old is not None:
            loss = loss + kd_loss(logits[:, : self.n_old], old, self.hp.T)
        return loss
