"""DER: Dynamically Expandable Representation (not Dark Experience Replay: ``dark-er``, ``dark-er++``).

Shipeng Yan, Jiangwei Xie, Xuming He, "DER: Dynamically Expandable Representation for Class
Incremental Learning", CVPR 2021. Official code (without masks, "DER w/o P"):
Rhyssiyan/DER-ClassIL.pytorch. Each task freezes the previous extractors and appends a new one;
a classifier over the concatenated features and an auxiliary classifier on the new extractor train
on the new data plus the exemplars; optional channel masks prune the new extractor (``masks.py``);
then the classifier is re-learnt alone on class-balanced data.

    L = CE(H_t(u(x)), y) + lambda_a CE(H_t^a(F_t(x)), y_a) + lambda_s L_S,   u(x) = [F_1(x); ...; F_t(x)]

Losses, options and their sources: docs/methods/der.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.methods.base import Method, StageOptimizer
from cilkit.methods.der.masks import MaskedExtractor, anneal_s
from cilkit.models.expandable import ExpandableBackbone, ExpandingLinear
from cilkit.models.heads import weight_align_gamma
from cilkit.models.network import freeze
from cilkit.schema import param
from cilkit.training.stage import Stage

log = logging.getLogger("cilkit")


def aux_targets(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Targets of the auxiliary head: 0 for every old class, 1..|C_t| for the new ones (y - n_old + 1)."""
    return torch.where(y >= n_old, y - n_old + 1, torch.zeros_like(y))


def count_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def align_new_rows(weight: torch.Tensor, n_old: int) -> float:
    """WA-style weight aligning (PyCIL's DER): rescale rows n_old: to the old rows' mean norm."""
    gamma = weight_align_gamma(weight, n_old)
    weight[n_old:] *= gamma
    return gamma


@dataclass
class DERHyper:
    # Representation learning stage (paper Sec. 3.2).
    aux_weight: float = param(1.0, ge=0)  # lambda_a (official code: loss_ce + loss_aux, use_aux_cls True [code])
    fc_bias: bool = False  # official config use_bias: False; PyCIL's DER has a bias
    reuse_old_fc: bool = True  # paper: old weights copied into H_t; official reuse_oldfc: False (new H_t)
    warmup_epochs: int = param(0, ge=0)  # the paper has none; official: 10 (CIFAR), 20 (ImageNet), then H_t, H_t^a reset
    warmup_first_task: bool = True  # official B0 warms up at step 1 too; B50's first step ("pretrain") does not
    # Classifier learning stage (paper Sec. 3.3; official "decouple" block).
    classifier_stage: Literal["relearn", "weight_align", "none"] = "relearn"  # weight_align: PyCIL's DER
    relearn_data: Literal["subset", "memory"] = "subset"  # subset: official balanced subset of D_t U M
    relearn_epochs: int = param(30, ge=0)  # official decouple.epochs 30
    relearn_lr: float = param(0.1, gt=0)  # official decouple.lr 0.1
    relearn_optimizer: StageOptimizer = "sgd"  # official decouple: SGD, whatever train.optimizer is
    relearn_milestones: list[int] = field(default_factory=lambda: [15])  # /10 at 15 (official)
    relearn_weight_decay: float = param(5e-4, ge=0)  # official decouple.weight_decay
    relearn_T: float = param(5.0, gt=0)  # official decouple.temperature 5 (CIFAR; ImageNet configs: 1)
    # Channel masks and pruning (paper Sec. 3.2, "DER" vs "DER w/o P"); not in the official code.
    mask: bool = False  # off: "DER w/o P", the released code and its curves
    sparsity_weight: float = param(1.0, ge=0)  # lambda_s [assumption: not given by the sources at hand]
    s_max: float = param(400.0, gt=0)  # [assumption: HAT's s_max; the DER value is not at hand]
    mask_init: float = 1.0  # e_l at the start of a step, every channel on [assumption]
    mask_compensation: bool = True  # the paper's gradient compensation of e_l


class DER(Method):
    name = "der"
    paper = ("Yan, Xie, He, DER: Dynamically Expandable Representation for Class Incremental Learning, CVPR 2021 "
             "(not Buzzega et al.'s Dark Experience Replay: `dark-er`, `dark-er++`)")
    Hyper = DERHyper
    memory_use = "required"

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        cls.check_stage_rate("relearn_lr", hp.relearn_optimizer, hp.relearn_lr)

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.backbone = ExpandableBackbone(net.backbone)
        net.head = ExpandingLinear(net.feature_dim, bias=hp.fc_bias, reuse_old=hp.reuse_old_fc)
        self.param_counts: list[dict] = []

    # -- structure ---------------------------------------------------------------------------

    @property
    def extractors(self) -> nn.ModuleList:
        return self.net.backbone.extractors

    def grow(self, task: Task) -> None:
        """Freeze F_1..F_{t-1}, append F_t (from F_{t-1}), then the larger H_t and a new H_t^a."""
        bb = self.net.backbone
        if task.index > 0:
            freeze(bb.extractors[-1])
            last = bb.extractors[-1]
            bb.expand(last.net if isinstance(last, MaskedExtractor) else last)
        if self.hp.mask:
            hp = self.hp
            bb.extractors[-1] = MaskedExtractor(bb.extractors[-1], hp.mask_init, hp.s_max, hp.mask_compensation)
        self.net.head.in_dim = bb.out_dim
        self.net.add_classes(task.n_classes)
        if task.index > 0:
            ref = self.net.head.weight
            aux = nn.Linear(bb.dims[-1], task.n_classes + 1, bias=self.hp.fc_bias)
            self.net.aux_head = aux.to(device=ref.device, dtype=ref.dtype)

    def train_mode(self) -> None:
        """F_t and the heads train; F_1..F_{t-1} stay in eval mode (every epoch)."""
        self.net.train()
        for e in self.extractors[:-1]:
            e.eval()

    def param_groups(self, task: Task) -> list[dict]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        masks = {id(p) for n, p in self.net.named_parameters() if n.endswith(".e") and p.requires_grad}
        groups = [{"params": [p for p in params if id(p) not in masks]}]
        if masks:  # the mask embeddings are not weight-decayed (decay would pull them to m = 1/2)
            groups.append({"params": [p for p in params if id(p) in masks], "weight_decay": 0.0})
        return groups

    # -- representation learning stage ---------------------------------------------------------

    def _warmup(self, task: Task) -> int:
        if task.index == 0 and not self.hp.warmup_first_task:
            return 0
        return min(self.hp.warmup_epochs, super().stage(task).epochs - 1)

    def stage(self, task: Task) -> Stage:
        st = super().stage(task)
        return st.replace(epochs=st.epochs - self._warmup(task))

    def before_task(self, task: Task) -> None:
        """Official warm-up: lr raised linearly over the first epochs, then H_t and H_t^a re-initialised."""
        w = self._warmup(task)
        if w == 0:
            return
        base = super().stage(task)
        idx = self.train_indices(task)
        for e in range(w):
            st = base.replace(epochs=1, lr=base.lr * (e + 1) / w, schedule="constant")
            self.fit(self.param_groups(task), idx, st, self.loss, desc=f"warm-up {e + 1}/{w}")
        self.net.head.reset_parameters()
        if task.index > 0:
            self.net.aux_head.reset_parameters()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        new = self.extractors[-1]
        masked = isinstance(new, MaskedExtractor)
        if masked:
            new.set_s(anneal_s(self.at.step, self.at.steps, self.hp.s_max))
        out = self.net(x)
        loss = F.cross_entropy(out["logits"], y)
        if self.task.index > 0 and self.hp.aux_weight > 0:
            aux_logits = self.net.aux_head(out["features"][:, -new.out_dim :])
            loss = loss + self.hp.aux_weight * F.cross_entropy(aux_logits, aux_targets(y, self.n_old))
        if masked and self.hp.sparsity_weight > 0:
            loss = loss + self.hp.sparsity_weight * new.sparsity_loss()
        return loss

    # -- after training: pruning, classifier learning, memory ------------------------------------

    def relearn_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE(H_t(u(x)) / T, y) on frozen super-features: only the classifier learns."""
        with torch.no_grad():
            f = self.net.backbone(x)["features"]
        return F.cross_entropy(self.net.head(f) / self.hp.relearn_T, y)

    def balanced_subset(self, task: Task) -> torch.Tensor:
        """D_t U M with every class cut to the smallest class's count, at random (official "balanced_train")."""
        idx = self.train_indices(task)
        labels = self.ctx.train_data.labels[idx].to(idx.device)
        per_class = [idx[labels == c] for c in range(task.stop)]
        k = min(len(p) for p in per_class)
        return torch.cat([p[torch.randperm(len(p), device=p.device)[:k]] for p in per_class])

    def relearn(self, task: Task) -> None:
        self.net.head.reset_parameters()
        stage = self.extra_stage(task, epochs=self.hp.relearn_epochs, lr=self.hp.relearn_lr, optimizer=self.hp.relearn_optimizer,
                                 schedule="multistep", milestones=list(self.hp.relearn_milestones),
                                 weight_decay=self.hp.relearn_weight_decay)
        params = list(self.net.head.parameters())
        if self.hp.relearn_data == "memory":  # every extractor and head frozen in eval mode
            self.update_memory(task)
            self.balanced_finetune(params, stage, self.relearn_loss, train_mode=self.net.eval)
            return
        self.fit([{"params": params}], self.balanced_subset(task), stage, self.relearn_loss, train_mode=self.net.eval,
                 desc="classifier re-learning")
        self.update_memory(task)

    def after_task(self, task: Task) -> None:
        counts = {"task": task.index, "params_trainable": count_params(self.net, trainable=True)}
        new = self.extractors[-1]
        if isinstance(new, MaskedExtractor):
            before = count_params(new.net)
            new.prune()
            log.info("DER: task %d pruned F_t from %d to %d parameters", task.index + 1, before, new.pruned_params())
        if task.index > 0 and self.hp.classifier_stage == "relearn":
            self.relearn(task)
        else:
            if task.index > 0 and self.hp.classifier_stage == "weight_align":
                gamma = align_new_rows(self.net.head.weight.data, self.n_old)
                log.info("DER: task %d weight aligning gamma %.4f", task.index + 1, gamma)
            self.update_memory(task)
        counts.update(self.count(), extractors=len(self.extractors))
        self.param_counts.append(counts)
        log.info("DER: task %d | %d extractors | %d parameters (%d after pruning) | %d trained",
                 task.index + 1, counts["extractors"], counts["params"], counts["params_pruned"], counts["params_trainable"])

    def count(self) -> dict:
        """Parameters of the inference network (extractors + classifier), dense and after pruning."""
        head = count_params(self.net.head)
        dense = sum(count_params(e.net if isinstance(e, MaskedExtractor) else e) for e in self.extractors)
        pruned = sum(e.pruned_params() if isinstance(e, MaskedExtractor) else count_params(e) for e in self.extractors)
        return {"params": dense + head, "params_pruned": pruned + head}

    def task_metrics(self) -> dict:
        """The parameter counts of the task: dense, after pruning, trained, and the extractors."""
        last = self.param_counts[-1]
        return {"parameters": last["params"], "parameters_pruned": last["params_pruned"],
                "parameters_trained": last["params_trainable"], "extractors": last["extractors"]}

    def state_dict(self) -> dict:
        return {"param_counts": [dict(c) for c in self.param_counts]}

    def load_state_dict(self, state: dict) -> None:
        self.param_counts = [dict(c) for c in state.get("param_counts", [])]
