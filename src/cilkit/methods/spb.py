"""SPB, SPB-I and SPB-M: striking a balance between stability and plasticity, without exemplars.

Guile Wu, Shaogang Gong, Pan Li, "Striking a Balance Between Stability and Plasticity for
Class-Incremental Learning", ICCV 2021, pp. 1124-1133. No official code and no full text were found;
what the abstract does not confirm is a documented [assumption], configurable. SPB: a cosine
classifier with prototype-initialised new rows, trained on the new data with reciprocal adaptive
weights on CE and feature distillation. SPB-I adds a self-supervised loss (rotation or instance
discrimination); SPB-M has one cosine classifier per rotation, ensembled at inference.

    L = (N_n/N_o) L_ce + (N_o/N_n) (1/B) sum_x || f(x)/||f(x)|| - f_old(x)/||f_old(x)|| ||_2^2   (SPB-I: + mu L_ss)

Losses, options and their sources: docs/methods/spb.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.augment import random_resized_crop_flip
from cilkit.data.scenario import Task
from cilkit.losses import embedding_distillation, masked_ce
from cilkit.losses.contrastive import info_nce
from cilkit.memory.nme import class_mean
from cilkit.methods.base import Method
from cilkit.models.heads import CosineLinear, RotationHead, projection_head
from cilkit.schema import param

log = logging.getLogger("cilkit")

N_ROTATIONS = 4  # 0, 90, 180, 270 degrees (gamma = 4)


def reciprocal_weights(n_old: int, n_new: int, clip: float | None = None) -> tuple[float, float]:
    """(w_ce, w_em) = (N_new / N_old, N_old / N_new); (1, 0) on the first task (no old classes).

    ``clip`` = c keeps both weights in [1/c, c] (docs/spec.md §14.6: the ratios blow up with a small
    base task or with many old classes). The two stay reciprocal when both are clamped.
    """
    if n_old == 0:
        return 1.0, 0.0
    w_ce, w_em = n_new / n_old, n_old / n_new
    if clip is not None:
        w_ce = min(max(w_ce, 1.0 / clip), clip)
        w_em = min(max(w_em, 1.0 / clip), clip)
    return w_ce, w_em


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch under 0/90/180/270 degrees, stacked in that order, and its rotation labels 0..3.

    Rotation k is ``torch.rot90(x, k, dims=(2, 3))``; the labels are ``[0]*B + [1]*B + [2]*B + [3]*B``.
    """
    b = x.shape[0]
    stacked = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(N_ROTATIONS)])
    labels = torch.arange(N_ROTATIONS, device=x.device).repeat_interleave(b)
    return stacked, labels


def second_view(x: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0)) -> torch.Tensor:
    """Another view of an already augmented, normalised batch: a random resized crop + flip, per sample.

    Tensor ops only (``affine_grid``/``grid_sample``, reflection padding) at the batch's own size.
    """
    return random_resized_crop_flip(x.float(), x.shape[-1], scale=scale, flip=True)


def ensemble_probabilities(logits: list[torch.Tensor]) -> torch.Tensor:
    """SPB-M's inference: the mean of the softmax outputs of the perspective classifiers."""
    return torch.stack([F.softmax(z.float(), dim=1) for z in logits]).mean(0)


@dataclass
class SPBHyper:
    scale_init: float = param(16.0, gt=0)  # s of the cosine classifier: learnable, init 16 [assumption, docs/spec.md §14.1]
    learn_scale: bool = True  # s is learned as in UCIR [assumption, docs/spec.md §14.1]; False keeps it at scale_init
    prototype_init: bool = True  # new rows = normalised class means (paper, per the secondary summary)
    adaptive_weights: bool = True  # reciprocal weights N_n/N_o and N_o/N_n (paper abstract); False: both 1
    clip_weights: float | None = param(None, ge=1)  # c: clamp both weights to [1/c, c] (docs/spec.md §14.6 pitfall; not in the paper)
    ce_mask: Literal["new", "all"] = "new"  # L_ce's softmax at t > 1 [assumption, see docs/methods/spb.md]


@dataclass
class SPBIHyper(SPBHyper):
    ssl: Literal["rotation", "instance"] = "rotation"  # the two SSL tasks of the paper; rotation is the default variant
    mu: float = 1.0  # weight of L_ss, not retrieved [assumption, docs/spec.md §14.2]
    tau: float = param(0.5, gt=0)  # InfoNCE temperature (ssl: instance) [assumption: SimCLR's CIFAR value]
    proj_dim: int = param(128, ge=1)  # output size of the projection delta (ssl: instance) [assumption: SimCLR]


@dataclass
class SPBMHyper(SPBHyper):
    inference: Literal["ensemble", "upright"] = "ensemble"  # mean softmax over the 4 rotated copies [assumption, docs/spec.md §14.3]
    distill_views: Literal["upright", "all"] = "upright"  # L_em on the 0-degree view or on all four [assumption]


class SPB(Method):
    name = "spb"
    paper = "Wu, Gong, Li, Striking a Balance between Stability and Plasticity for Class-Incremental Learning, ICCV 2021"
    Hyper = SPBHyper
    memory_use = "none"  # exemplar-free by design
    distills = True  # L_em needs the previous extractor only

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = self.cosine_head()
        self.w_ce, self.w_em = 1.0, 0.0

    def cosine_head(self) -> CosineLinear:
        return CosineLinear(self.net.feature_dim, sigma=self.hp.scale_init, learn_scale=self.hp.learn_scale)

    def classifiers(self) -> list[CosineLinear]:
        """The class classifiers; SPB-M has one per rotation, the k-th for images rotated by k * 90 degrees."""
        return [self.net.head]

    # -- before each task: teacher, weights, prototypes ----------------------------------------------

    def before_task(self, task: Task) -> None:
        n_old, n_new = task.start, task.n_classes
        if self.hp.adaptive_weights:
            self.w_ce, self.w_em = reciprocal_weights(n_old, n_new, self.hp.clip_weights)
        else:
            self.w_ce, self.w_em = 1.0, (1.0 if n_old else 0.0)
        weights = f"w_ce = {self.w_ce:.4g}, w_em = {self.w_em:.4g}"
        log.info("%s task %d: %d old, %d new classes: %s", self.name, task.index + 1, n_old, n_new, weights)
        if task.index > 0 and self.hp.prototype_init:
            self.init_prototypes(task)

    @torch.no_grad()
    def init_prototypes(self, task: Task) -> None:
        """Each classifier's new rows: normalised means of the normalised features of its rotation."""
        for k, head in enumerate(self.classifiers()):
            rows = torch.stack([class_mean(self.perspective_features(c, k)) for c in task.classes])
            head.blocks[-1].copy_(rows.to(head.blocks[-1]))

    def perspective_features(self, c: int, k: int) -> torch.Tensor:
        """Features of class ``c``'s training images rotated by k * 90 degrees (eval, test transforms)."""
        if k == 0:
            return self.class_features(c)
        idx = self.ctx.train_data.indices_of([c])
        return self.features(idx, transform=lambda x: torch.rot90(x, k, dims=(2, 3)), forward=self.net.backbone)

    # -- losses ---------------------------------------------------------------------------------------

    def distill(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_em between the student's features ``f`` of ``x`` and the teacher's on the same batch."""
        return embedding_distillation(f, self.teacher.backbone(x)["features"])

    def balance(self, l_ce: torch.Tensor, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """w_ce * L_ce + w_em * L_em (just L_ce on the first task)."""
        if self.teacher is None:
            return l_ce
        return self.w_ce * l_ce + self.w_em * self.distill(f, x)

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_ce: over the new classes (ce_mask: new) or every seen class (all); all seen on task 1."""
        return masked_ce(logits, y, self.n_old, self.hp.ce_mask)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.net.backbone(x)["features"]
        return self.balance(self.ce(self.net.head(f), y), f, x)


class SPBI(SPB):
    name = "spb-i"
    paper = SPB.paper + " (SPB-I: class-independent knowledge)"
    Hyper = SPBIHyper

    @classmethod
    def needs_maps(cls, hp) -> bool:
        return hp.ssl == "rotation"  # the rotation head reads the pre-pooling map

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        if hp.ssl == "rotation":
            # The pre-pooling map has feature_dim channels: the features are its global average.
            net.ssl_head = RotationHead(net.feature_dim, hp.scale_init, hp.learn_scale)
        else:
            net.ssl_head = projection_head(net.feature_dim, hp.proj_dim)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = len(y)
        if self.hp.ssl == "rotation":
            stacked, r = rotations(x)
            out = self.net.backbone(stacked)
            l_ss = F.cross_entropy(self.net.ssl_head(out["maps"][-1]).float(), r)
        else:
            out = self.net.backbone(torch.cat([x, second_view(x).to(x.dtype)]))
            z = self.net.ssl_head(out["features"])
            l_ss = info_nce(z[:b], z[b:], self.hp.tau)
        f = out["features"][:b]  # the upright (first) view
        return self.balance(self.ce(self.net.head(f), y), f, x) + self.hp.mu * l_ss


class SPBM(SPB):
    name = "spb-m"
    paper = SPB.paper + " (SPB-M: multi-perspective knowledge)"
    Hyper = SPBMHyper

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        # The 90/180/270-degree classifiers live on the network: in its state_dict and parameters.
        net.rot_heads = nn.ModuleList(self.cosine_head() for _ in range(N_ROTATIONS - 1))

    def classifiers(self) -> list[CosineLinear]:
        return [self.net.head, *self.net.rot_heads]

    def grow(self, task: Task) -> None:
        super().grow(task)
        for head in self.net.rot_heads:
            head.add_classes(task.n_classes)

    def perspective_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Logits of each classifier on its rotation of ``x``; also all the features and the rotated batch."""
        stacked, _ = rotations(x)
        f = self.net.backbone(stacked)["features"]
        views = f.chunk(N_ROTATIONS)  # not split(len(x)): a trace (export) keeps the batch size free
        return [head(v) for head, v in zip(self.classifiers(), views)], f, stacked

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, f, stacked = self.perspective_logits(x)
        l_mp = sum(self.ce(z, y) for z in logits) / N_ROTATIONS
        if self.hp.distill_views == "all":
            return self.balance(l_mp, f, stacked)
        return self.balance(l_mp, f[: len(x)], x)

    def inference(self, x: torch.Tensor) -> dict:
        if self.hp.inference == "upright":
            return self.net(x)
        logits, f, _ = self.perspective_logits(x)
        p = ensemble_probabilities(logits)
        return {"logits": p.clamp_min(1e-30).log(), "features": f[: x.shape[0]]}
