"""PASS: prototype augmentation and self-supervised label augmentation, without exemplars.

Fei Zhu, Xu-Yao Zhang, Chuang Wang, Fei Yin, Cheng-Lin Liu, "Prototype Augmentation and Self-Supervision
for Incremental Learning", CVPR 2021, pp. 5871-5880; official code github.com/Impression2805/CVPR21_PASS
(PASS.py, main.py, myNetwork.py); PyCIL's models/pa2s.py is the other reference. Every class is split
into 4 classes by rotating its images by 0/90/180/270 degrees (the head has 4 rows a class, row 4c + k
for class c under rotation k). After each task the method keeps one prototype per new class (the mean
of its features) and a radius r from the class variances; while learning a later task, each old class
is represented by pseudo-features drawn around its prototype, and the features are distilled from the
previous model:

    L = CE(z(rot_k x) / T, 4y + k)  +  lambda_proto CE(W (mu_c + r e) / T, 4c)  +  lambda_kd ||f(x) - f_old(x)||_2
    r = sqrt( (1/K_1) sum_c tr(Sigma_c) / D ),   e ~ N(0, I_D),   c drawn uniformly among the old classes

At test time only the unrotated rows count (logits[:, ::4]). Losses, options and their sources:
docs/methods/pass.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.base import Method
from cilkit.methods.spb import N_ROTATIONS, rotations
from cilkit.models.heads import IncrementalLinear
from cilkit.schema import param

log = logging.getLogger("cilkit")


class LabelAugmentedLinear(nn.Module):
    """A growing linear head with ``m`` rows per class, class-major: row ``m * c + k`` is class ``c`` under
    transformation ``k`` (the official ``target * 4 + k``). ``n_classes`` counts the original classes."""

    def __init__(self, in_dim: int, m: int):
        super().__init__()
        self.m = m
        self.linear = IncrementalLinear(in_dim)

    @property
    def n_classes(self) -> int:
        return self.linear.n_classes // self.m

    def add_classes(self, n: int) -> None:
        self.linear.add_classes(self.m * n)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def rotation_labels(y: torch.Tensor, r: torch.Tensor, m: int = N_ROTATIONS) -> torch.Tensor:
    """The augmented label of class ``y`` under rotation ``r``: m * y + r. ``y`` is the batch's labels (B) and
    ``r`` the rotation labels of the stacked batch (m * B, rotation-major as :func:`rotations` stacks it)."""
    return m * y.repeat(len(r) // len(y)) + r


def class_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A class's prototype (the plain mean of its features, not normalised) and its mean variance
    tr(Sigma) / D, with Sigma the unbiased sample covariance (the official ``np.cov``; 0 for one sample)."""
    x = features.float()
    mean = x.mean(0)
    var = x.var(0, correction=1).mean() if len(x) > 1 else x.new_zeros(())
    return mean, var


def radius(variances: torch.Tensor) -> torch.Tensor:
    """r = sqrt(mean_c tr(Sigma_c) / D) over the classes whose mean variances are given."""
    return variances.float().mean().sqrt()


def proto_augment(prototypes: torch.Tensor, r: torch.Tensor | float, n: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pseudo-features of the classes of ``prototypes`` [C, D] and their class indices: a class drawn
    uniformly (with replacement) for each, then its prototype plus Gaussian noise of scale ``r``:
    mu_c + r e, e ~ N(0, I_D)."""
    device = prototypes.device if generator is None else generator.device
    classes = torch.randint(len(prototypes), (n,), generator=generator, device=device).to(prototypes.device)
    noise = torch.randn(n, prototypes.shape[1], generator=generator, device=device).to(prototypes.device)
    return prototypes[classes] + noise * r, classes


def feature_distillation(f: torch.Tensor, f_old: torch.Tensor, reduction: str = "batch") -> torch.Tensor:
    """L_kd between the student's and the (detached) teacher's features of the same batch.

    ``batch``: the Euclidean norm of the whole difference, sqrt(sum_x ||f(x) - f_old(x)||^2), as the
    official ``torch.dist(feature, feature_old, 2)``; ``sample``: the mean over the batch of the per-sample
    distances ||f(x) - f_old(x)||_2.
    """
    diff = f.float() - f_old.detach().float()
    if reduction == "sample":
        return diff.norm(dim=1).mean()
    return diff.norm()


@dataclass
class PASSHyper:
    # lambda of L_protoAug: 10 [recalled: paper]; official main.py --protoAug_weight 10, PyCIL lambda_proto 10
    lambda_proto: float = param(10.0, ge=0)
    # gamma of L_kd: 10 [recalled: paper]; official main.py --kd_weight 10, PyCIL lambda_fkd 10
    lambda_kd: float = param(10.0, ge=0)
    # T: both cross-entropies take logits / T; official main.py --temp 0.1 ("training time temperature"), PyCIL
    # temp 0.1 [code]; the paper's text states none [recalled], so the code's value is the default
    temperature: float = param(0.1, gt=0)
    # self-supervised label augmentation by rotation (4 classes a class) [paper]; false: the ablation without it
    ssl: bool = True
    # first: r from the first task's classes only, then fixed [code: PASS.py protoSave, current_task == 0];
    # every: recomputed after every task over all classes seen so far (PyCIL _build_protos)
    radius: Literal["first", "every"] = "first"
    # batch: one Euclidean distance over the whole (rotated) batch, torch.dist [code]; sample: the mean of the
    # per-sample distances [assumption: another reading of the paper's ||f - f_old||_2]
    kd: Literal["batch", "sample"] = "batch"
    # pseudo-features a step: batch, as many as the batch's images before rotation [code: args.batch_size];
    # ratio: that times floor(n_old / n_new), at least once (PyCIL)
    n_pseudo: Literal["batch", "ratio"] = "batch"
    # upright: the unrotated rows only, logits[:, ::4] [code; recalled: paper]; aggregate: the mean over the 4 rotations
    # of the logit of (c, k) on the image rotated by k (the aggregated inference of Lee et al.'s SLA, ICML 2020)
    inference: Literal["upright", "aggregate"] = "upright"


class PASS(Method):
    name = "pass"
    paper = ("Zhu, Zhang, Wang, Yin, Liu, Prototype Augmentation and Self-Supervision for Incremental Learning, "
             "CVPR 2021")
    Hyper = PASSHyper
    memory_use = "none"  # exemplar-free: one prototype a class and one radius
    distills = True  # L_kd needs the previous extractor

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.m = N_ROTATIONS if hp.ssl else 1
        net.head = LabelAugmentedLinear(net.feature_dim, self.m)
        self.prototypes: torch.Tensor | None = None  # [n_seen, D]: each class's mean feature, from the model after its task
        self.variances: torch.Tensor | None = None  # [n_seen]: each class's tr(Sigma_c) / D
        self.radius: torch.Tensor | None = None  # r, a 0-d tensor

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if hp.inference == "aggregate" and not hp.ssl:
            raise ConfigError("method_args.inference", "'aggregate' combines the rotation classes, which ssl: false removes; "
                              "use inference: upright or ssl: true")
        if cfg.train.optimizer == "sgd" and hp.temperature < 1 and max(hp.lambda_proto, hp.lambda_kd) > 1:
            log.warning("pass: temperature %g (logits x %g) and the weights lambda_proto %g, lambda_kd %g were tuned with "
                        "Adam lr 1e-3 (the paper's optimizer); with train.optimizer sgd, training may collapse onto the "
                        "newest classes: use a protocols/*/pass preset (Adam), or temperature 1 or weights 1 "
                        "(docs/methods/pass.md, Optimizer)", hp.temperature, 1 / hp.temperature, hp.lambda_proto, hp.lambda_kd)

    # -- the loss -------------------------------------------------------------------------------------

    def augment_labels(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and its labels after the label augmentation: the 4 rotations, labels 4y + k (ssl), or as given."""
        if self.m == 1:
            return x, y
        stacked, r = rotations(x)
        return stacked, rotation_labels(y, r, self.m)

    def n_pseudo(self, batch: int) -> int:
        if self.hp.n_pseudo == "ratio":
            return batch * max(1, self.n_old // max(1, self.task.n_classes))
        return batch

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xs, ys = self.augment_labels(x, y)
        f = self.net.backbone(xs)["features"]
        T = self.hp.temperature
        loss = F.cross_entropy(self.net.head(f).float() / T, ys)
        if self.teacher is None:
            return loss
        l_kd = feature_distillation(f, self.teacher.backbone(xs)["features"], self.hp.kd)
        pseudo, c = proto_augment(self.prototypes[: self.n_old], self.radius, self.n_pseudo(len(y)))
        l_proto = F.cross_entropy(self.net.head(pseudo.to(f.dtype)).float() / T, self.m * c)
        return loss + self.hp.lambda_proto * l_proto + self.hp.lambda_kd * l_kd

    # -- prototypes and the radius, after each task -----------------------------------------------------

    def extract(self, c: int) -> torch.Tensor:
        """Backbone features of class ``c``'s training images (eval mode, test transforms, upright)."""
        return self.features(self.ctx.train_data.indices_of([c]), forward=self.net.backbone)

    def after_task(self, task: Task) -> None:
        """The new classes' prototypes and mean variances, from the model just trained; the radius from the
        first task's classes (``radius: first``) or from every class so far (``every``)."""
        stats = [class_statistics(self.extract(c).detach()) for c in task.classes]
        means = torch.stack([s[0] for s in stats])
        variances = torch.stack([s[1] for s in stats])
        first = self.prototypes is None
        self.prototypes = means if first else torch.cat([self.prototypes, means])
        self.variances = variances if first else torch.cat([self.variances, variances])
        if first or self.hp.radius == "every":
            self.radius = radius(self.variances)
        log.info("%s task %d: %d prototypes, radius %.4g", self.name, task.index + 1, len(self.prototypes), self.radius.item())

    # -- prediction -----------------------------------------------------------------------------------

    def inference(self, x: torch.Tensor) -> dict:
        if self.hp.inference == "upright" or self.m == 1:
            out = self.net(x)
            return {"logits": out["logits"][:, :: self.m], "features": out["features"]}
        out = self.net(rotations(x)[0])
        z = out["logits"].float().split(len(x))  # z[k]: the logits of the images rotated by k * 90 degrees
        logits = torch.stack([z[k][:, k :: self.m] for k in range(self.m)]).mean(0)
        return {"logits": logits, "features": out["features"][: len(x)]}

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("prototypes", "variances", "radius") if getattr(self, key) is not None}

    def load_state_dict(self, state: dict) -> None:
        for key in ("prototypes", "variances", "radius"):
            value = state.get(key)
            setattr(self, key, value.to(self.ctx.device) if value is not None else None)
