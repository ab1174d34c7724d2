"""COIL: co-transport for class-incremental learning.

Da-Wei Zhou, Han-Jia Ye, De-Chuan Zhan, "Co-Transport for Class-Incremental Learning", ACM
Multimedia 2021, pp. 1645-1654 (arXiv 2107.12654). Official code: zhoudw-zdw/MM21-Coil
(``models/COIL.py``), the same as PyCIL's ``models/coil.py``; where the paper (not at hand) would
decide, the code is followed. A cosine classifier trains with CE and distillation on the new data
plus the exemplars; optimal transport between class prototypes initialises the new rows from the old
ones (prospective) and maps the new rows back onto the old classes to mimic the teacher (retrospective).

    L = (1 - lambda) CE(z, y) + lambda KD_T(z_old, g_old) + pt_weight w_PT(e) L_PT + rt_weight w_RT(e) L_RT

Losses, options and their sources: docs/methods/coil.md
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.losses import kd_loss
from cilkit.memory.nme import class_mean
from cilkit.methods.base import Method
from cilkit.models.heads import CosineLinear, mean_row_norm
from cilkit.schema import param

log = logging.getLogger("cilkit")


@dataclass
class COILHyper:
    T: float = param(2.0, gt=0)  # temperature of KD, L_PT and L_RT (official COIL.py: T = 2)
    sinkhorn_reg: float = param(0.464, gt=0)  # entropic regularisation (official main.py --sinkhorn 0.464)
    norm_term: float = param(3.0, ge=1)  # p of the Minkowski cost torch.cdist(p) (official --norm_term 3.0)
    pt_weight: float = param(1e-3, ge=0)  # weight of L_PT, epoch 0 (official COIL.py: hard-coded 0.001)
    rt_weight: float = param(1e-3, ge=0)  # weight of L_RT, epochs >= 1 (official --reg_term 1e-3)
    rt_every: int = param(30, ge=1)  # RT plan recomputed at batches 0, 30, 60, ... of each epoch (official i % 30 == 0)
    marginals: Literal["normalized", "pycil"] = "normalized"  # both sum to 1; pycil: 1/|C_old| everywhere (code)
    use_pt: bool = True  # prospective transport: OT initialisation of the new rows and L_PT (ablation: false)
    use_rt: bool = True  # retrospective transport L_RT (ablation: false)
    pt_old_prototypes: Literal["memory", "data"] = "memory"  # old prototypes from exemplars [assumption]; data = code
    rt_samples_per_class: int = param(50, ge=0)  # RT prototypes from <= this many samples a class [assumption]; 0 = all (code)


def pt_schedule(epoch: int) -> float:
    """w_PT(e) = max(1 - (e/2)^2, 0)."""
    return max(1.0 - (epoch / 2) ** 2, 0.0)


def rt_schedule(epoch: int, epochs: int) -> float:
    """w_RT(e) = (e/E)^2."""
    return (epoch / epochs) ** 2


def class_prototypes(features: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One unit row per class: normalise(mean of the L2-normalised features of the class).

    A class without samples (a memory quota of 0) gets a zero row.
    """
    rows = [class_mean(f) if len(f) else f.new_zeros(f.shape[1]) for f in features.float().split(counts)]
    return torch.stack(rows)


def transport_plan(cost: torch.Tensor, reg: float, marginals: str, n_old: int) -> torch.Tensor:
    """Entropic OT plan (n_src x n_dst) by POT's Sinkhorn-Knopp, in float64.

    ``normalized``: a = 1/n_src, b = 1/n_dst. ``pycil``: a = b = 1/n_old, as the official code; the
    plan is then the normalized one times sum(a) (docs/methods/coil.md), and POT's non-convergence
    warning is silenced.
    """
    M = cost.detach().double().cpu()
    n_src, n_dst = M.shape
    if marginals == "normalized":
        a, b = torch.full((n_src,), 1.0 / n_src, dtype=M.dtype), torch.full((n_dst,), 1.0 / n_dst, dtype=M.dtype)
    else:
        a, b = torch.full((n_src,), 1.0 / n_old, dtype=M.dtype), torch.full((n_dst,), 1.0 / n_old, dtype=M.dtype)
    with warnings.catch_warnings():
        if marginals == "pycil":
            warnings.simplefilter("ignore")
        import ot  # POT; imported here so that cilkit starts where only other methods are used

        plan = ot.sinkhorn(a, b, M, reg)
    return plan.to(device=cost.device, dtype=torch.float32)


def transported_weights(plan: torch.Tensor, W_src: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * plan^T normalise(W_src): one row per destination class.

    With normalized marginals and scale = n_dst every row is a convex combination of unit source rows.
    """
    return scale * plan.t() @ F.normalize(W_src.detach().float(), dim=1)


def calibrate(W_hat: torch.Tensor, W_old: torch.Tensor) -> tuple[torch.Tensor, float]:
    """gamma = mean ||W_old|| / mean ||W_hat||; returns (gamma * W_hat, gamma)."""
    gamma = (mean_row_norm(W_old.detach()) / mean_row_norm(W_hat)).item()
    return gamma * W_hat, gamma


def prospective_weights(P_old, P_new, W_old, hp: COILHyper) -> tuple[torch.Tensor, float]:
    """PT: the calibrated initial rows of the new classes (old -> new plan) and gamma."""
    n_old, n_new = len(P_old), len(P_new)
    plan = transport_plan(torch.cdist(P_old, P_new, p=hp.norm_term), hp.sinkhorn_reg, hp.marginals, n_old)
    W_hat = transported_weights(plan, W_old, n_new if hp.marginals == "normalized" else n_old)
    return calibrate(W_hat, W_old)


def retrospective_weights(P_old, P_new, W_new, hp: COILHyper) -> torch.Tensor:
    """RT: pseudo-old rows transported from the new classes' rows (new -> old plan)."""
    n_old = len(P_old)
    cost = torch.cdist(P_new, P_old, p=hp.norm_term) + 1e-8  # the code's epsilon
    plan = transport_plan(cost, hp.sinkhorn_reg, hp.marginals, n_old)
    return transported_weights(plan, W_new, n_old)  # only the directions are used


def pt_loss(f_unit: torch.Tensor, W_hat: torch.Tensor, z_new: torch.Tensor, T: float) -> torch.Tensor:
    """L_PT: new-class logits against the OT-initialised classifier's prediction (target not detached)."""
    target = F.softmax(f_unit @ F.normalize(W_hat, dim=1).t() / T, dim=1)
    return -(target * F.log_softmax(z_new.float() / T, dim=1)).sum(1).mean()


def rt_loss(f_unit: torch.Tensor, W_retro: torch.Tensor, z_teacher_old: torch.Tensor, T: float) -> torch.Tensor:
    """L_RT: the transported pseudo-old classifier on current features mimics the teacher."""
    return kd_loss(f_unit @ F.normalize(W_retro, dim=1).t(), z_teacher_old, T)


class COIL(Method):
    name = "coil"
    paper = "Zhou, Ye, Zhan, Co-Transport for Class-Incremental Learning, ACM MM 2021"
    Hyper = COILHyper
    memory_use = "required"
    distills = True  # g, the model after task t-1
    backbone_options: ClassVar[dict] = {"last_relu": False}  # PyCIL's cosine_resnet32: no ReLU after the last block

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = CosineLinear(net.feature_dim, sigma=1.0, learn_scale=True)  # PyCIL: sigma starts at 1
        self.W_hat: torch.Tensor | None = None  # PT classifier (fixed during the task)
        self.W_retro: torch.Tensor | None = None  # RT classifier (refreshed every rt_every batches)
        self.rt_indices: list[torch.Tensor] = []  # per seen class: the samples of its RT prototype
        self.gammas: list[float] = []

    # -- prototypes and transports -----------------------------------------------------------------

    def prototypes(self, index_lists: list[torch.Tensor]) -> torch.Tensor:
        """Prototypes of classes given their sample indices, with the current model (eval mode)."""
        idx = [i.to(self.ctx.device) for i in index_lists]
        return class_prototypes(self.features(torch.cat(idx)), [len(i) for i in idx])

    def before_task(self, task: Task) -> None:
        self.W_hat, self.W_retro = None, None
        if task.index == 0:
            return
        data = self.ctx.train_data
        old, new = range(task.start), list(task.classes)
        if self.hp.use_pt:
            src = [self.memory.exemplars[c] if self.hp.pt_old_prototypes == "memory" else data.indices_of([c]) for c in old]
            P = self.prototypes(src + [data.indices_of([c]) for c in new])
            self.prospective_transport(task, P[: task.start], P[task.start :])
        if self.hp.use_rt:
            cap = self.hp.rt_samples_per_class
            olds = [self.memory.exemplars[c] for c in old]  # herding-ranked: the first `cap` are kept
            news = [data.indices_of([c]) for c in new]
            news = [i[torch.randperm(len(i), device=i.device)] for i in news]  # a random subset of new data
            self.rt_indices = [i[:cap] if cap > 0 else i for i in olds + news]

    @torch.no_grad()
    def prospective_transport(self, task: Task, P_old: torch.Tensor, P_new: torch.Tensor) -> None:
        """Initialise the new rows by transporting the old classifier (PT) and keep it as W_hat."""
        head = self.net.head
        W, gamma = prospective_weights(P_old, P_new, head.weight[: task.start], self.hp)
        head.blocks[task.index].copy_(W.to(head.blocks[task.index]))
        self.W_hat = W
        self.gammas.append(gamma)
        log.info("COIL: task %d prospective transport, gamma %.4f", task.index + 1, gamma)

    @torch.no_grad()
    def retrospective_transport(self) -> torch.Tensor:
        P = self.prototypes(self.rt_indices)
        W_new = self.net.head.blocks[self.task.index]
        return retrospective_weights(P[: self.n_old], P[self.n_old :], W_new, self.hp)

    # -- loss --------------------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        epoch = self.at.epoch
        rt_on = self.teacher is not None and self.hp.use_rt and epoch >= 1
        if rt_on and self.at.step % self.hp.rt_every == 0:
            self.W_retro = self.retrospective_transport()
        f = self.net.backbone(x)["features"]
        z = self.net.head(f).float()
        ce = F.cross_entropy(z, y)
        if self.teacher is None:
            return ce
        z_old = self.teacher.old_logits(x, self.n_old).float()
        lam = self.task.old_fraction
        loss = (1.0 - lam) * ce + lam * kd_loss(z[:, : self.n_old], z_old, self.hp.T)
        f_unit = F.normalize(f.float(), dim=1)
        if self.hp.use_pt and epoch == 0 and self.W_hat is not None:
            loss = loss + self.hp.pt_weight * pt_schedule(epoch) * pt_loss(f_unit, self.W_hat, z[:, self.n_old :], self.hp.T)
        if rt_on and self.W_retro is not None:
            w = self.hp.rt_weight * rt_schedule(epoch, self.at.epochs)
            loss = loss + w * rt_loss(f_unit, self.W_retro, z_old, self.hp.T)
        return loss

    def after_task(self, task: Task) -> None:
        super().after_task(task)
        self.W_hat, self.W_retro, self.rt_indices = None, None, []

    def state_dict(self) -> dict:
        return {"gammas": list(self.gammas)}

    def load_state_dict(self, state: dict) -> None:
        self.gammas = list(state.get("gammas", []))
