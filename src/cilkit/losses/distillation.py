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


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class weights from the effective number of samples (Cui et al., CVPR 2019), normalised to mean 1.

        w_c = (1 - beta) / (1 - beta^{n_c}),     w <- C w / sum_c w_c

    A class with fewer samples gets a larger weight; ``beta = 0`` gives every class weight 1. FOSTER
    uses them for its logits alignment (beta_1) and its balanced distillation (beta_2); every count
    must be positive and ``0 <= beta < 1``.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ValueError(f"effective_number_weights needs positive class counts, got {counts.tolist()}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (w / w.sum() * counts.numel()).float()


def balanced_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, class_weights: torch.Tensor,
                T: float = 2.0) -> torch.Tensor:
    """Class-balanced distillation (FOSTER's compression stage, BEEF's fusion): the teacher's softened
    distribution reweighted per class and renormalised is the student's target,

        q_k(x) = w_k softmax(t(x)/T)_k / sum_j w_j softmax(t(x)/T)_j
        L = -(1/B) sum_x sum_k q_k(x) log softmax(s(x)/T)_k

    (no T^2 factor, as the official FOSTER code). With equal weights it is :func:`kd_loss`. The
    teacher is detached.
    """
    w = class_weights.to(device=logits.device, dtype=torch.float32)
    q = F.softmax(teacher_logits.detach().float() / T, dim=1) * w
    q = q / q.sum(1, keepdim=True)
    return -(q * F.log_softmax(logits.float() / T, dim=1)).sum(1).mean()
