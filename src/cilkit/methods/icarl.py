"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi et al., CVPR 2017).

Reference: S.-A. Rebuffi, A. Kolesnikov, G. Sperl and C. H. Lampert, "iCaRL: Incremental
Classifier and Representation Learning", CVPR 2017 (methods-spec section 5).

Three parts:

1. Exemplar memory (Alg. 4/5): after each task, every old class keeps the first m = K / n_seen of
   its herding-ranked exemplars and each new class gets m herding exemplars, under a fixed total
   budget K (``memory.size``). The engine does this in ``after_task`` with the model after training.

2. Representation learning (Alg. 3) on D_t U M, all parameters trained. Before the task the network
   is frozen into g^{t-1}; with g the current network, n_old = |C_old| and n_seen = |C_old U C_new|,
   every sample (x, y_i) of the batch, new or exemplar, gets the target vector

       target_y = sigma(g^{t-1}_y(x))     for y in C_old     (distillation)
       target_y = [y = y_i]               for y in C_new     (one-hot among the new classes)

   and the loss (``loss: bce``, the paper's) is the binary cross-entropy with logits

       L = (1 / (B * n_seen)) sum_x sum_{y <= n_seen}
               -[ target_y log sigma(g_y(x)) + (1 - target_y) log(1 - sigma(g_y(x))) ].

   On the first task (no teacher) this is plain multi-label BCE against one-hot targets.
   Mean vs. sum: the paper writes the loss of one sample as a *sum* over the outputs; the spec's
   reference (``inclearn/models/icarl.py``, methods-spec 5.3) averages over the batch *and* the
   outputs, as is done here (the original Theano code is recalled to do the same [recalled]).
   With SGD, lr eta on this mean equals lr eta / n_seen on the per-sample sum (weight decay
   aside): the paper's large lr of 2.0 goes with the mean reduction, and the step per output
   shrinks as classes accumulate. With a protocol's lr of 0.1 the BCE loss trains more slowly.

   ``loss: softmax_kd`` (PyCIL's ``models/icarl.py``) replaces it by
       L = CE( g_{1..n_seen}(x), y ) + KD_T( g_{1..n_old}(x), g^{t-1}_{1..n_old}(x) ),  T = 2,
   with KD_T as in :func:`cilkit.losses.kd_loss` (no T^2 factor, weight 1).

3. Classification by the nearest mean of exemplars (Alg. 1): mu_y = the normalised mean of the
   L2-normalised features of class y's exemplars and of their horizontal flips (original code),
   y* = argmin_y || phi(x)/||phi(x)|| - mu_y ||. The engine computes it for every method with a
   memory: the NME figures (``nme_*``) are iCaRL's headline accuracy. Whether the flips enter the
   means is ``memory.nme_flip``: ``auto`` flips when the training augmentation flips (CIFAR,
   ImageNet), ``true`` is the paper's behaviour, ``false`` PyCIL's (exemplars only). The CNN
   figures (argmax of the sigmoid outputs, the paper's "hybrid1") are reported alongside.
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
    # g^{t-1}, the network after the previous task; its outputs on the same augmented batch are
    # equivalent to storing q_y(x) before training (Alg. 3)
    distills = True

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
