"""Knowledge distillation (Hinton et al., 2015) as class-incremental methods use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 2.0, t2: bool = False) -> torch.Tensor:
    """Cross-entropy between softened teacher and student distributions, averaged over the batch.

        KD_T(s, t) = -(1/B) sum_x sum_k softmax(t/T)_k log softmax(s/T)_k     (times T^2 if ``t2``)

    ``teacher`` is detached: no gradient ever reaches the teacher. PyCIL's LwF/iCaRL/WA/BiC use no
    T^2 factor; Hinton et al. and SS-IL do.
    """
    p_teacher = F.softmax(teacher.detach().float() / T, dim=1)
    loss = -(p_teacher * F.log_softmax(student.float() / T, dim=1)).sum(1).mean()
    return loss * (T * T) if t2 else loss


def embedding_distillation(f_new: torch.Tensor, f_old: torch.Tensor) -> torch.Tensor:
    """L_em = (1/B) sum_x || f_new(x)/||f_new(x)|| - f_old(x)/||f_old(x)|| ||_2^2 (teacher detached)."""
    diff = F.normalize(f_new.float(), dim=1) - F.normalize(f_old.detach().float(), dim=1)
    return diff.pow(2).sum(1).mean()
