"""FOSTER: Feature Boosting and Compression.

Fu-Yun Wang, Da-Wei Zhou, Han-Jia Ye, De-Chuan Zhan, "FOSTER: Feature Boosting and Compression for
Class-Incremental Learning", ECCV 2022. Official code: G-U-N/ECCV22-FOSTER (also PyCIL's
``models/foster.py``). Every task after the first runs two stages:

1. Feature boosting (the task's main training): a new extractor phi_t, a copy of the current one,
   is trained beside the frozen old model; the boosted model's logits S_b(x) = W [phi_old(x); phi_t(x)]
   fit the residual of the old model, with logits alignment (the logits divided by per-class weights
   from the effective number of samples), an auxiliary classifier on phi_t over every seen class, and
   distillation of the old model's logits,

       L_boost = CE(S_b(x) / w^(1), y) + CE(W_a phi_t(x), y) + lambda_kd KD_T(S_b(x)_old, S_old(x)).

2. Feature compression (an extra ``fit``): the single-backbone network (initialised from the old
   extractor and classifier) learns from the boosted model by class-balanced distillation only,

       L_comp = -sum_k q_k log softmax(S_s(x)/T)_k,   q ∝ w^(2) ⊙ softmax(S_b(x)/T).

The network the driver holds (``self.net``) is always the single-backbone student, so a checkpoint
and its resume need no boosted model: it is built in ``before_task`` and dropped after the compression
(kept until the next task with ``evaluated: boosted``, the official trainer's evaluation).
Losses, options and their sources: docs/methods/foster.md
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses.distillation import balanced_kd, effective_number_weights, kd_loss
from cilkit.methods.base import Method, StageOptimizer
from cilkit.models.expandable import ExpandableBackbone, ExpandingLinear
from cilkit.models.network import freeze
from cilkit.schema import param

log = logging.getLogger("cilkit")


def aligned_logits(logits: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """FOSTER's logits alignment: S_b(x)_k / w_k, the logits the boosting cross-entropy sees.

    A class with few samples (an old class, in the memory) has a large weight, so its logit is shrunk
    during training and the model must raise it: at test time (no division) the old classes are
    favoured against the data imbalance. Computed in float32 (the division under bf16 autocast would
    round the weights)."""
    return logits.float() / class_weights.to(device=logits.device, dtype=torch.float32)


def count_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


class BoostedNet(nn.Module):
    """The boosting model of a task: [phi_old; phi_t] with the classifier W over both, an auxiliary
    classifier W_a on phi_t over every seen class, and the old model's logits (its frozen head on
    phi_old) for the distillation. ``forward`` returns ``logits``, ``features`` (the concatenation),
    ``maps`` (phi_t's), ``fe_logits`` and ``old_logits``; phi_old runs once for both."""

    def __init__(self, old: nn.Module, n_old: int, *, zero_new_columns: bool = True):
        """``old``: the frozen network of the previous task (its backbone and head, ``n_old`` old rows)."""
        super().__init__()
        self.n_old = n_old
        self.old_head = old.head
        self.backbone = ExpandableBackbone(old.backbone)
        new = self.backbone.expand(old.backbone)  # phi_t: a trainable copy of phi_old (official load_state_dict)
        d_old, d_new = old.backbone.out_dim, new.out_dim
        ref = old.head.weight
        head = ExpandingLinear(d_old, bias=old.head.bias is not None, reuse_old=True)
        with torch.no_grad():
            head.weight = nn.Parameter(ref[:n_old].detach().clone())
            if head.bias is not None:
                head.bias = nn.Parameter(old.head.bias[:n_old].detach().clone())
        head.in_dim = d_old + d_new
        head.add_classes(ref.shape[0] - n_old)  # old rows keep their weights on phi_old's columns, 0 on phi_t's
        if not zero_new_columns:  # official FOSTERNet.update_fc: the old rows' phi_t columns keep a fresh init
            with torch.no_grad():
                bound = 1.0 / math.sqrt(head.in_dim)
                head.weight[:n_old, d_old:].uniform_(-bound, bound)
        self.head = head
        self.aux_head = nn.Linear(d_new, ref.shape[0]).to(device=ref.device, dtype=ref.dtype)
        self.d_old = d_old

    @property
    def new(self) -> nn.Module:
        return self.backbone.extractors[-1]

    def inference_params(self) -> int:
        """Parameters the boosted model predicts with: both extractors and the classifier W."""
        return count_params(self.backbone) + count_params(self.head)

    def train_mode(self) -> None:
        """phi_t and the classifiers train; phi_old stays in eval mode (BatchNorm statistics frozen)."""
        self.train()
        self.backbone.extractors[0].eval()

    def forward(self, x: torch.Tensor) -> dict:
        out = self.backbone(x)
        f = out["features"]
        out["logits"] = self.head(f)
        out["fe_logits"] = self.aux_head(f[:, self.d_old :])
        with torch.no_grad():
            out["old_logits"] = self.old_head(f[:, : self.d_old].detach())[:, : self.n_old]
        return out


@dataclass
class FOSTERHyper:
    # Feature boosting (paper Sec. 4.2 [recalled]; official configs/cifar/*.json [code]).
    # logits alignment's beta: official b0inc5 and PyCIL 0.96 [code]; a list gives one value per task after
    # the first (official b0inc10: 0.98 ... 0.94), the last repeating (param() returns a field: no shared default)
    beta1: float | list[float] = param(0.96, ge=0, lt=1)  # noqa: RUF009
    T: float = param(2.0, gt=0)  # KD temperature, both stages (official "T": 2 [code])
    kd_weight: float = param(1.0, ge=0)  # lambda_kd (official lambda_okd 1 [code])
    fe_weight: float = param(1.0, ge=0)  # weight of the auxiliary (feature enhancement) loss; 1 in the code [code]
    new_columns: Literal["zero", "random"] = "zero"  # the old rows' weights on phi_t's features at the start:
    # zero (S_b = S_old on the old classes, the boosting view) | random (official update_fc keeps nn.Linear's init)
    new_rows_old_features: Literal["train", "zero"] = "train"  # official oofc: ft (train) | az (kept at 0)
    # Feature compression (paper Sec. 4.3 [recalled]; official _feature_compression [code]).
    beta2: float = param(0.97, ge=0, lt=1)  # balanced KD's beta (every official config: 0.97 [code])
    compression_epochs: int = param(130, ge=0)  # official compression_epochs 130 (CIFAR, ImageNet) [code]; 0: none
    compression_lr: float = param(0.1, gt=0)  # official lr 0.1 [code]
    compression_optimizer: StageOptimizer = "sgd"  # official SGD momentum 0.9 [code]
    compression_weight_decay: float = param(0.0, ge=0)  # the official compression optimizer has none [code]
    # Which model is evaluated (and selects the exemplars) after a task: the compressed single-backbone
    # student (the paper's claim) or the boosted two-backbone model (what the official trainer evaluates:
    # the student replaces it only at the start of the next task, ECCV22-FOSTER issue #6 [code])
    evaluated: Literal["student", "boosted"] = "student"


class FOSTER(Method):
    name = "foster"
    paper = "Wang, Zhou, Ye, Zhan, FOSTER: Feature Boosting and Compression for Class-Incremental Learning, ECCV 2022"
    Hyper = FOSTERHyper
    memory_use = "required"
    distills = True  # the teacher is the previous task's single-backbone network (phi_old and its classifier)

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        cls.check_stage_rate("compression_lr", hp.compression_optimizer, hp.compression_lr)
        if isinstance(hp.beta1, list) and not hp.beta1:
            raise ConfigError("method_args.beta1", "an empty list: give a number or one value per task after the first")

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = ExpandingLinear(net.feature_dim, bias=True, reuse_old=True)  # official SimpleLinear has a bias
        self.boosted: BoostedNet | None = None
        self.w1: torch.Tensor | None = None
        self.w2: torch.Tensor | None = None
        self.param_counts: list[dict] = []

    # -- the boosting stage ----------------------------------------------------------------------

    def beta1_of(self, task: Task) -> float:
        b = self.hp.beta1
        return b[min(task.index - 1, len(b) - 1)] if isinstance(b, list) else b

    def class_counts(self, task: Task) -> torch.Tensor:
        """Training samples of every seen class in the task's data (new data + exemplars); a class
        without any (a budget smaller than the classes) counts 1."""
        idx = self.train_indices(task)
        labels = self.ctx.train_data.labels[idx.to(self.ctx.train_data.labels.device)]
        return torch.bincount(labels.long().cpu(), minlength=task.stop)[: task.stop].clamp(min=1)

    def before_task(self, task: Task) -> None:
        """Build the boosted model (the structure of this task only) and the two stages' class weights."""
        self.boosted = None
        if task.index == 0:
            return
        self.boosted = BoostedNet(self.teacher.module, self.n_old, zero_new_columns=self.hp.new_columns == "zero")
        if self.hp.new_rows_old_features == "zero":
            self.zero_new_rows_on_old_features()
        counts = self.class_counts(task)
        dev = self.ctx.device
        self.w1 = effective_number_weights(counts, self.beta1_of(task)).to(dev)
        self.w2 = effective_number_weights(counts, self.hp.beta2).to(dev)
        log.info("FOSTER: task %d | beta1 %.4g: weights old %.3f new %.3f | beta2 %.4g: old %.3f new %.3f", task.index + 1,
                 self.beta1_of(task), self.w1[0], self.w1[-1], self.hp.beta2, self.w2[0], self.w2[-1])

    @torch.no_grad()
    def zero_new_rows_on_old_features(self) -> None:
        self.boosted.head.weight[self.n_old :, : self.boosted.d_old] = 0.0

    def after_step(self) -> None:
        """Official ``oofc: az``: the new classes' weights on phi_old stay 0 (zeroed after every step)."""
        if self.boosted is not None and self.hp.new_rows_old_features == "zero":
            self.zero_new_rows_on_old_features()

    def param_groups(self, task: Task) -> list[dict]:
        model = self.net if self.boosted is None else self.boosted
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def train_mode(self) -> None:
        if self.boosted is None:
            self.net.train()
        else:
            self.boosted.train_mode()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.boosted is None:  # the first task: cross-entropy (official _init_train)
            return F.cross_entropy(self.net(x)["logits"], y)
        out = self.boosted(x)
        z = out["logits"]
        loss = F.cross_entropy(aligned_logits(z, self.w1), y)
        if self.hp.fe_weight > 0:
            loss = loss + self.hp.fe_weight * F.cross_entropy(out["fe_logits"].float(), y)
        if self.hp.kd_weight > 0:
            loss = loss + self.hp.kd_weight * kd_loss(z[:, : self.n_old], out["old_logits"], self.hp.T)
        return loss

    # -- the compression stage -------------------------------------------------------------------

    def compression_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Balanced KD of the boosted model's logits into the single-backbone network (no label term)."""
        with torch.no_grad():
            target = self.boosted(x)["logits"]
        return balanced_kd(self.net(x)["logits"], target, self.w2, self.hp.T)

    def compression_mode(self) -> None:
        self.net.train()
        self.boosted.eval()

    def compress(self, task: Task) -> None:
        """The student is ``self.net`` as ``grow`` left it: phi_old's weights and the old classifier rows
        (official: convnets[0] and oldfc copied into a new FOSTERNet), new rows freshly initialised."""
        freeze(self.boosted)
        stage = self.extra_stage(task, epochs=self.hp.compression_epochs, lr=self.hp.compression_lr,
                                 optimizer=self.hp.compression_optimizer, schedule="cosine",
                                 weight_decay=self.hp.compression_weight_decay)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.fit([{"params": params}], self.train_indices(task), stage, self.compression_loss,
                 train_mode=self.compression_mode, desc="compression")

    # -- after the task ---------------------------------------------------------------------------

    def after_task(self, task: Task) -> None:
        counts = {"task": task.index, "params_student": count_params(self.net)}
        if self.boosted is not None:
            counts["params_boosted"] = self.boosted.inference_params()
            counts["params_boosting_trained"] = count_params(self.boosted, trainable=True)
            if self.hp.compression_epochs > 0:
                self.compress(task)
            else:  # no compression stage: the student keeps the old extractor and learns nothing new
                log.warning("FOSTER: compression_epochs 0: the single-backbone network is not trained on task %d", task.index + 1)
            if self.hp.evaluated == "student":
                self.boosted = None
        else:
            counts["params_boosted"] = counts["params_student"]
            counts["params_boosting_trained"] = count_params(self.net, trainable=True)
        self.update_memory(task)
        evaluated = self.boosted if self.boosted is not None else self.net
        boosted = isinstance(evaluated, BoostedNet)
        counts.update(params=evaluated.inference_params() if boosted else count_params(evaluated),
                      extractors=2 if boosted else 1, exemplars=len(self.memory))
        self.param_counts.append(counts)
        log.info("FOSTER: task %d | evaluated model %d parameters (%d extractor(s)) | single backbone %d | boosted %d "
                 "(%d trained) | %d exemplars", task.index + 1, counts["params"], counts["extractors"],
                 counts["params_student"], counts["params_boosted"], counts["params_boosting_trained"], counts["exemplars"])

    def inference(self, x: torch.Tensor) -> dict:
        if self.boosted is not None and self.hp.evaluated == "boosted":
            with torch.no_grad():
                return self.boosted(x)
        return self.net(x)

    def task_metrics(self) -> dict:
        """The task's budgets: parameters of the evaluated model, of the single backbone and of the boosted
        model, and the exemplars kept."""
        last = self.param_counts[-1]
        return {"parameters": last["params"], "parameters_single": last["params_student"],
                "parameters_boosted": last["params_boosted"], "parameters_trained": last["params_boosting_trained"],
                "extractors": last["extractors"], "exemplars": last["exemplars"]}

    def state_dict(self) -> dict:
        return {"param_counts": [dict(c) for c in self.param_counts]}

    def load_state_dict(self, state: dict) -> None:
        self.param_counts = [dict(c) for c in state.get("param_counts", [])]
