"""LwM: Learning without Memorizing.

P. Dhar, R. V. Singh, K.-C. Peng, Z. Wu and R. Chellappa, "Learning without Memorizing", CVPR 2019
(arXiv:1811.08051). Exemplar-free: LwF's losses on the new data (CE on the new classes, distillation
of the old logits) plus an attention distillation between the teacher's and the student's Grad-CAM
maps, on the last convolutional map, for the teacher's top base class.

    L = L_C + beta * KD_T(z_{1..n_old}, z^T_{1..n_old}) + gamma * (1/B) sum_x || Q_T/||Q_T||_2 - Q_S/||Q_S||_2 ||_1

Losses, options and their sources: docs/methods/lwm.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.errors import ConfigError
from cilkit.losses import kd_loss, masked_ce
from cilkit.methods.base import Method
from cilkit.schema import param


@dataclass
class LwMHyper:
    beta: float = param(1.0, ge=0)  # weight of L_D; Dhar et al. Eq. 3 gives no value (FACIL's note too) [assumption]
    gamma: float = param(0.3, ge=0)  # weight of L_AD; no value in the paper [assumption, chosen on digits, see docs/methods/lwm.md]
    T: float = param(2.0, gt=0)  # L_D is LwF's distillation (Li & Hoiem 2016: T = 2); FACIL's LwM uses T = 2 (power 1/2)
    t2: bool = False  # no T^2 factor in LwF's L_old nor in FACIL's LwM
    distill: Literal["kd", "bce"] = "kd"  # "kd": LwF's softened CE (paper); "bce": Douillard's sigmoid BCE
    ce_mask: Literal["new", "all"] = "new"  # L_C on the new classes (paper; FACIL, Douillard); "all": every seen class
    attention_class: Literal["teacher", "student", "own"] = "teacher"  # paper: the teacher's top base class
    gradcam_create_graph: bool = True  # exact gradient through alpha_k; False: alpha_k constant (Douillard)


def grad_cam(score: torch.Tensor, fmap: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM maps (B, H, W): ReLU(sum_k alpha_k A_k), alpha_k = mean_ij d score / d A_k,ij.

    ``score`` is the sum over the batch of each sample's selected logit (a sample's logit depends on
    its own map only, so the gradient is per sample). The gradient is taken with
    ``torch.autograd.grad``, so no parameter's ``.grad`` is touched.
    """
    (grads,) = torch.autograd.grad(score, fmap, create_graph=create_graph, retain_graph=True)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * fmap).sum(dim=1))


def attention_distillation(q_teacher: torch.Tensor, q_student: torch.Tensor) -> torch.Tensor:
    """L_AD = mean over the batch of || Q_T/||Q_T||_2 - Q_S/||Q_S||_2 ||_1 on vectorised maps."""
    qt = F.normalize(q_teacher.flatten(1).float(), p=2, dim=1)
    qs = F.normalize(q_student.flatten(1).float(), p=2, dim=1)
    return (qt - qs).abs().sum(dim=1).mean()


def selected(logits: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of logits[i, b_i]: the score whose gradient Grad-CAM takes."""
    return logits.gather(1, b[:, None]).sum()


class LwM(Method):
    name = "lwm"
    paper = "Dhar et al., Learning without Memorizing, CVPR 2019"
    Hyper = LwMHyper
    memory_use = "none"  # exemplar-free by design
    distills = True  # M_{t-1}, the network after the previous task

    @classmethod
    def needs_maps(cls, hp) -> bool:
        return True  # Grad-CAM on the last convolutional map

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if cfg.train.compile:
            # A compiled backbone returns its map and its pooled features as sibling outputs of one
            # autograd node, so d z_b / d A cannot be taken through it.
            raise ConfigError(
                "train.compile",
                "LwM's Grad-CAM needs the gradient of the logits w.r.t. the last map, "
                "which a compiled backbone does not expose: set train.compile to false",
            )

    # -- the losses ---------------------------------------------------------------------------------

    def class_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_C: cross-entropy over the new classes' logits (or over all seen ones)."""
        return masked_ce(logits, y, self.n_old, self.hp.ce_mask)

    def distill_loss(self, student_old: torch.Tensor, teacher_old: torch.Tensor) -> torch.Tensor:
        """L_D on the old classes' logits."""
        if self.hp.distill == "bce":
            return F.binary_cross_entropy_with_logits(student_old.float(), torch.sigmoid(teacher_old.detach().float()))
        return kd_loss(student_old, teacher_old, self.hp.T, self.hp.t2)

    def teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's old-class logits and its last map A_T, a leaf that requires grad.

        A forward hook replaces the last stage's output by a grad-requiring leaf, so that only the
        pooling and the head are recorded: alpha_k = d z_b / d A_T needs no gradient in the
        teacher's parameters, which stay frozen (and their .grad stays None).
        """
        captured: list[torch.Tensor] = []

        def make_leaf(module, inputs, output):
            captured.append(output.detach().requires_grad_(True))
            return captured[-1]

        teacher = self.teacher.module
        handle = teacher.backbone.stages[-1].register_forward_hook(make_leaf)
        try:
            with torch.enable_grad():
                old = teacher(x)["logits"][:, : self.n_old]
        finally:
            handle.remove()
        return old, captured[-1]

    def attention_classes(self, teacher_old: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Grad-CAM class b of the teacher's and of the student's map."""
        if self.hp.attention_class == "student":  # Douillard: the student's argmax over the old classes
            b = logits[:, : self.n_old].detach().argmax(1)
            return b, b
        b_teacher = teacher_old.detach().argmax(1)
        if self.hp.attention_class == "own":  # FACIL: each model's own argmax (the student over all seen)
            return b_teacher, logits.detach().argmax(1)
        return b_teacher, b_teacher  # the paper: the teacher's top base class for both

    def attention_loss(self, out: dict, teacher_old: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """L_AD between the teacher's and the student's Grad-CAM maps on the same batch."""
        b_teacher, b_student = self.attention_classes(teacher_old, out["logits"])
        q_teacher = grad_cam(selected(teacher_old, b_teacher), teacher_map).detach()
        q_student = grad_cam(selected(out["logits"], b_student), out["maps"][-1], self.hp.gradcam_create_graph)
        return attention_distillation(q_teacher, q_student)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        logits = out["logits"]
        loss = self.class_loss(logits, y)
        if self.teacher is None:
            return loss
        teacher_old, teacher_map = self.teacher_forward(x)
        loss = loss + self.hp.beta * self.distill_loss(logits[:, : self.n_old], teacher_old.detach())
        if self.hp.gamma:
            loss = loss + self.hp.gamma * self.attention_loss(out, teacher_old, teacher_map)
        return loss
