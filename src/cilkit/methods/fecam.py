"""FeCAM: a feature extractor frozen after the first task and a Mahalanobis classifier over class statistics.

Dipam Goswami, Yuyang Liu, Bartłomiej Twardowski, Joost van de Weijer, "FeCAM: Exploiting the
Heterogeneity of Class Distributions in Exemplar-Free Continual Learning", NeurIPS 2023; official code
github.com/dipamgoswami/FeCAM (models/fecam.py, models/base.py, utils/maha_utils.py). The first task
trains the network with cross-entropy. From then on nothing is trained: :meth:`FeCAM.stage` gives the
driver's main training 0 epochs, so the loop takes no step and the extractor (BatchNorm statistics
included) stays as the first task left it. After every task, each new class keeps a prototype and a
covariance of its Tukey-transformed training features (eval mode, test transforms), shrunk and
normalised to a correlation matrix; a sample goes to the class at the smallest Mahalanobis distance:

    x~ = x^beta (Tukey, beta = 0.5)    mu_c = mean of x~ over class c
    S_c = corr(shrink(cov of x~ over class c)),  shrink(S) = S + g1 V1 I + g2 V2 (1 - I)
    d_c(x) = (n(x~) - n(mu_c))^T S_c^+ (n(x~) - n(mu_c))     logits = -d     (n: L2 normalisation)

The statistics are tensors of the method's state (checkpoints). Options and sources: docs/methods/fecam.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.methods.base import Method
from cilkit.models.heads import CosineLinear
from cilkit.schema import param
from cilkit.training.stage import Stage

log = logging.getLogger("cilkit")


# -- the statistics (float64 on the CPU: the official code uses numpy's float64 np.cov) ------------------------


def tukey(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Tukey's ladder of powers, x^beta (beta > 0), on non-negative features."""
    return x.pow(beta)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """The unbiased sample covariance (rows: samples), as ``np.cov(x.T)``; zeros for a single sample."""
    if len(x) < 2:
        return x.new_zeros(x.shape[1], x.shape[1])
    return torch.cov(x.T, correction=1)


def shrink(cov: torch.Tensor, gamma1: float, gamma2: float) -> torch.Tensor:
    """Covariance shrinkage: S + gamma1 V1 I + gamma2 V2 (1 - I), with V1 the mean variance (diagonal) and V2 the
    mean of the non-zero off-diagonal entries (the official ``shrink_cov`` skips the zero ones)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    off = cov * (1 - eye)
    v1 = cov.diagonal().mean()
    v2 = off.sum() / (off != 0).sum().clamp_min(1)
    return cov + gamma1 * v1 * eye + gamma2 * v2 * (1 - eye)


def correlation(cov: torch.Tensor) -> torch.Tensor:
    """The correlation matrix S_ij / (s_i s_j) (a dimension of zero variance gets a zero row and column)."""
    sd = cov.diagonal().clamp_min(0).sqrt()
    return cov / (sd[:, None] * sd[None, :]).clamp_min(1e-30)


def normalized_diagonal(cov: torch.Tensor) -> torch.Tensor:
    """The official ``diagonal`` variant: the diagonal alone, divided by its L2 norm (``normalize_cov2``)."""
    diag = cov.diagonal()
    return torch.diag(diag / diag.norm().clamp_min(1e-30))


def mahalanobis(x: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances [B, C] of ``x`` [B, d] to ``means`` [C, d] under ``precisions`` [C, d, d]
    (one inverse covariance per class) or [1, d, d] (one for all)."""
    diff = x[:, None, :] - means[None]  # B, C, d
    if precisions.shape[0] == 1:
        left = diff @ precisions[0]
    else:
        left = torch.einsum("bcd,cde->bce", diff, precisions)
    return (left * diff).sum(-1)


@dataclass
class FeCAMHyper:
    beta: float = param(0.5, gt=0)  # Tukey's lambda: paper, Sec. 4 [recalled]; official exps/*.json "beta": 0.5
    tukey: bool = True  # Tukey's transform of the features [paper]; official "tukey": true
    # class: a full covariance per class [paper; official per_class + full_cov]; common: one covariance for all
    # classes, the class-weighted running mean of each task's (official per_class: false); diagonal: official
    # "diagonal" (variances only, divided by their norm); identity: Euclidean NCM (official "ncm")
    covariance: Literal["class", "common", "diagonal", "identity"] = "class"
    shrink: int = param(1, ge=0)  # shrinkage passes: the paper's formula once; the official code shrinks twice; 0: none
    gamma1: float = param(1.0, ge=0)  # shrinkage of the diagonal: official "alpha1": 1
    gamma2: float = param(1.0, ge=0)  # shrinkage of the off-diagonal: official "alpha2": 1
    correlation: bool = True  # covariance -> correlation matrix [paper]; official "norm_cov": true
    normalize: bool = True  # L2-normalise the transformed feature and the prototype before the difference (official _mahalanobis)
    # transformed: mu = mean of x^beta [assumption: the Gaussian model of the transformed features];
    # raw: mu = (mean of x)^beta, the official code's (it keeps raw means and transforms them at test time)
    prototype: Literal["transformed", "raw"] = "transformed"
    # the first task's prediction: mahalanobis [assumption], or the trained head (official: the distance to the
    # cosine classifier's weights, that is its argmax)
    first_task: Literal["mahalanobis", "head"] = "mahalanobis"
    head: Literal["linear", "cosine"] = "linear"  # the first task's classifier; official: a cosine one (sigma 1, learned)


class FeCAM(Method):
    name = "fecam"
    paper = ("Goswami, Liu, Twardowski, van de Weijer, FeCAM: Exploiting the Heterogeneity of Class Distributions "
             "in Exemplar-Free Continual Learning, NeurIPS 2023")
    Hyper = FeCAMHyper
    memory_use = "none"  # exemplar-free: a prototype and a covariance per class

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        if hp.head == "cosine":
            net.head = CosineLinear(net.feature_dim, sigma=1.0, learn_scale=True)
        self.prototypes: torch.Tensor | None = None  # [n_seen, d]: mu_c, transformed (not L2-normalised)
        self.precisions: torch.Tensor | None = None  # [n_seen, d, d], or [1, d, d] for common and identity
        self.common: torch.Tensor | None = None  # covariance: common, the running shared covariance (before corr)

    # -- the frozen extractor -----------------------------------------------------------------------------

    def stage(self, task: Task) -> Stage:
        """The first task trains with the configured stage; every later one has 0 epochs (the loop takes no
        step): the extractor is frozen and the classifier needs no training."""
        stage = super().stage(task)
        return stage if task.index == 0 else stage.replace(epochs=0)

    def extract(self, c: int) -> torch.Tensor:
        """Backbone features of class ``c``'s training images (eval mode, test transforms)."""
        return self.features(self.ctx.train_data.indices_of([c]), forward=self.net.backbone)

    # -- the statistics, after each task ------------------------------------------------------------------

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return tukey(x, self.hp.beta) if self.hp.tukey else x

    def process(self, cov: torch.Tensor) -> torch.Tensor:
        """Shrinkage (``shrink`` passes), then the correlation normalisation when ``correlation``."""
        for _ in range(self.hp.shrink):
            cov = shrink(cov, self.hp.gamma1, self.hp.gamma2)
        return correlation(cov) if self.hp.correlation else cov

    def after_task(self, task: Task) -> None:
        feats = {c: self.extract(c).detach().double().cpu() for c in task.classes}
        if self.hp.tukey and any((f < 0).any() for f in feats.values()):
            raise ValueError("FeCAM's Tukey transform needs non-negative features: keep the backbone's last ReLU "
                             "(or set method_args.tukey: false)")
        z = {c: self.transform(f) for c, f in feats.items()}
        if self.hp.prototype == "transformed":
            protos = [z[c].mean(0) for c in task.classes]
        else:
            protos = [self.transform(feats[c].mean(0)) for c in task.classes]
        d = len(protos[0])
        device = self.ctx.device
        new_protos = torch.stack(protos).float().to(device)
        self.prototypes = new_protos if self.prototypes is None else torch.cat([self.prototypes, new_protos])
        kind = self.hp.covariance
        if kind == "class":
            new = torch.stack([torch.linalg.pinv(self.process(covariance(z[c]))) for c in task.classes])
            self.precisions = self._append(new.float().to(device))
        elif kind == "diagonal":
            new = [covariance(z[c]) for c in task.classes]
            for _ in range(self.hp.shrink):
                new = [shrink(s, self.hp.gamma1, self.hp.gamma2) for s in new]
            new = torch.stack([torch.linalg.pinv(normalized_diagonal(s)) for s in new])
            self.precisions = self._append(new.float().to(device))
        elif kind == "common":
            cov = covariance(torch.cat([z[c] for c in task.classes]))  # all the task's features, as the official np.cov
            for _ in range(self.hp.shrink):
                cov = shrink(cov, self.hp.gamma1, self.hp.gamma2)
            if self.common is None:
                common = cov
            else:
                ratio = task.start / task.stop  # official compute_new_common_cov: old classes / seen classes
                common = ratio * self.common.double().cpu() + (1 - ratio) * cov
            self.common = common.float().to(device)
            shared = correlation(common) if self.hp.correlation else common
            self.precisions = torch.linalg.pinv(shared)[None].float().to(device)
        else:  # identity: the Euclidean NCM
            self.precisions = torch.eye(d, device=device)[None]
        log.info("%s task %d: prototypes and %s covariances of %d classes", self.name, task.index + 1, kind, task.stop)

    def _append(self, new: torch.Tensor) -> torch.Tensor:
        return new if self.precisions is None else torch.cat([self.precisions, new])

    # -- prediction -----------------------------------------------------------------------------------------

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances [B, n_seen] of backbone features to every seen class."""
        z, mu = self.transform(features.float()), self.prototypes
        if self.hp.normalize:
            z, mu = F.normalize(z, dim=1), F.normalize(mu, dim=1)
        return mahalanobis(z, mu, self.precisions)

    def inference(self, x: torch.Tensor) -> dict:
        out = self.net(x)
        if self.prototypes is None or (self.hp.first_task == "head" and self.task is not None and self.task.index == 0):
            return out
        with torch.autocast(x.device.type, enabled=False):  # the distances in float32, outside bf16 autocast
            logits = -self.distances(out["features"].float())
        return {"logits": logits, "features": out["features"]}

    # -- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {}
        for key in ("prototypes", "precisions", "common"):
            if getattr(self, key) is not None:
                state[key] = getattr(self, key)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("prototypes", "precisions", "common"):
            value = state.get(key)
            setattr(self, key, value.to(self.ctx.device) if value is not None else None)
