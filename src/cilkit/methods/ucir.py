"""UCIR / LUCIR: a unified cosine classifier learned incrementally, with rebalancing.

Saihui Hou, Xinyu Pan, Chen Change Loy, Zilei Wang, Dahua Lin, "Learning a Unified Classifier
Incrementally via Rebalancing", CVPR 2019. Official code: hshustc/CVPR19_Incremental_Learning.
A cosine classifier on a signed embedding; the new rows are imprinted from class means and the old
rows frozen; a less-forget constraint on the normalised embedding and a margin ranking loss on the
old-class samples; then class-balanced finetuning of the classifier on the exemplars.

    L = CE(sigma * cos(x), y) + lambda * (1/B) sum_x [1 - cos(f*(x), f(x))] + w_mr * L_mr
    lambda = lambda_base * sqrt(|C_o| / |C_n|)

Losses, options and their sources: docs/methods/ucir.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.memory.nme import class_mean
from cilkit.methods.base import Method, StageOptimizer
from cilkit.models.heads import CosineLinear, mean_row_norm
from cilkit.schema import param


@dataclass
class UCIRHyper:
    # Less-forget constraint (paper; section numbers not checked against the PDF).
    lambda_base: float = param(5.0, ge=0)  # 5 on CIFAR-100 (official run.sh --lamda 5); 10 on ImageNet (--lamda 10)
    adaptive_lambda: bool = True  # lambda = lambda_base * sqrt(|C_o|/|C_n|) (paper; --adapt_lamda)
    # Inter-class separation (paper's margin ranking loss).
    K: int = param(2, ge=1)  # hard new-class negatives per old-class sample (official --K 2)
    margin: float = 0.5  # m (official --dist 0.5)
    mr_weight: float = param(1.0, ge=0)  # weight of L_mr (official --lw_mr 1)
    # Cosine normalisation (paper); imprinting of the new rows (official code, docs/spec.md §8.2).
    imprint: bool = True  # imprint the new rows (official --imprint_weights); False keeps a random init
    sigma_init: float = param(1.0, gt=0)  # initial learnable scale (official modified_linear fills sigma with 1)
    # Class-balanced finetuning (paper's "CBF"; official cbf_class_incremental_cosine_*.py, docs/spec.md §8.5).
    cbf: bool = True  # part of the full method in the paper's results [recalled]
    cbf_epochs: int = param(20, ge=0)  # official --ft_epochs 20
    cbf_lr: float = param(0.01, gt=0)  # official --ft_base_lr 0.01 (PODNet's UCIR config: 0.05, constant)
    cbf_optimizer: StageOptimizer = "sgd"  # official cbf script: SGD (momentum, weight decay: the task's), whatever train.optimizer is
    cbf_milestones: list[int] = field(default_factory=lambda: [10])  # lr x0.1 at epoch 10 (--ft_lr_strat 10)


def adaptive_lambda(lambda_base: float, n_old: int, n_new: int) -> float:
    """lambda = lambda_base * sqrt(n_old / n_new): more old classes, more weight on the old embedding."""
    return lambda_base * math.sqrt(n_old / n_new)


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """L_dis = mean_x (1 - cos(f*(x), f(x))); no gradient reaches the teacher's features."""
    return (1.0 - F.cosine_similarity(features.float(), old_features.detach().float(), dim=1)).mean()


def margin_ranking_loss(cos: torch.Tensor, y: torch.Tensor, n_old: int, K: int, margin: float) -> torch.Tensor:
    """L_mr on the unscaled cosines ``cos`` (B x seen classes), for the samples of old classes only.

    For each such sample, its ground-truth cosine must beat each of its K largest new-class cosines
    by ``margin``; the hinge terms are averaged over (old-class samples x K) pairs, as
    ``nn.MarginRankingLoss`` does in the official code. Zero when the batch holds no old class.
    """
    hard = y < n_old
    if not bool(hard.any()):
        return cos.new_zeros(())
    cos = cos[hard].float()
    gt = cos.gather(1, y[hard].unsqueeze(1))
    negatives = cos[:, n_old:].topk(min(K, cos.shape[1] - n_old), dim=1).values
    return F.relu(margin - gt + negatives).mean()


def imprinted_weights(class_features: list[torch.Tensor], norm: torch.Tensor | float) -> torch.Tensor:
    """One row per class: ``norm`` * normalise(mean of the L2-normalised features of the class)."""
    return torch.stack([class_mean(f) for f in class_features]) * norm


class UCIR(Method):
    name = "ucir"
    paper = "Hou, Pan, Loy, Wang, Lin, Learning a Unified Classifier Incrementally via Rebalancing, CVPR 2019"
    Hyper = UCIRHyper
    memory_use = "required"
    distills = True  # f*, the model after the previous task
    backbone_options: ClassVar[dict] = {"last_relu": False}  # signed embedding: no ReLU after the last block

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        cls.check_stage_rate("cbf_lr", hp.cbf_optimizer, hp.cbf_lr)

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = CosineLinear(net.feature_dim, sigma=hp.sigma_init, learn_scale=True)
        self.lam = 0.0

    def before_task(self, task: Task) -> None:
        if task.index == 0:
            return
        n_old, n_new = task.start, task.n_classes
        self.lam = adaptive_lambda(self.hp.lambda_base, n_old, n_new) if self.hp.adaptive_lambda else self.hp.lambda_base
        if self.hp.imprint:
            head = self.net.head
            with torch.no_grad():
                old_norm = mean_row_norm(head.weight[:n_old])
                rows = imprinted_weights([self.class_features(c) for c in task.classes], old_norm)
                head.blocks[task.index].copy_(rows.to(head.blocks[task.index]))

    def param_groups(self, task: Task) -> list[dict]:
        """The old class rows sit in a group with lr 0 and no weight decay: the optimizer never moves them."""
        old = list(self.net.head.blocks[: task.index])
        frozen = {id(p) for p in old}
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad and id(p) not in frozen]}]
        if old:
            groups.append({"params": old, "lr": 0.0, "weight_decay": 0.0})
        return groups

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.net.backbone(x)["features"]
        cos = self.net.head.cosine(f).float()
        loss = F.cross_entropy(self.net.head.sigma * cos, y)
        if self.teacher is None:
            return loss
        loss = loss + self.lam * less_forget_loss(f, self.teacher(x)["features"])
        return loss + self.hp.mr_weight * margin_ranking_loss(cos, y, self.n_old, self.hp.K, self.hp.margin)

    def cbf_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE + w_mr * L_mr on frozen features with a fixed sigma: only the class rows learn."""
        with torch.no_grad():
            f = self.net.backbone(x)["features"]
        cos = self.net.head.cosine(f).float()
        loss = F.cross_entropy(self.net.head.sigma.detach() * cos, y)
        return loss + self.hp.mr_weight * margin_ranking_loss(cos, y, self.n_old, self.hp.K, self.hp.margin)

    def after_task(self, task: Task) -> None:
        self.update_memory(task)  # herding; new classes reduced to the quota before CBF
        if task.index > 0 and self.hp.cbf:
            stage = self.extra_stage(task, epochs=self.hp.cbf_epochs, lr=self.hp.cbf_lr, optimizer=self.hp.cbf_optimizer,
                                     schedule="multistep", milestones=list(self.hp.cbf_milestones))
            self.balanced_finetune(list(self.net.head.blocks), stage, self.cbf_loss)
