"""BEEF: Bi-Compatible Energy-Based Expansion and Fusion.

Fu-Yun Wang, Da-Wei Zhou, Liu Liu, Han-Jia Ye, Yatao Bian, De-Chuan Zhan, Peilin Zhao, "BEEF:
Bi-Compatible Class-Incremental Learning via Energy-Based Expansion and Fusion", ICLR 2023. Official
code: G-U-N/ICLR23-BEEF (``models/beef_iso.py``, ``utils/inc_net.py``: ``BEEFISONet``).

Each task t appends a new extractor F_t (the old ones frozen) and trains it *alone*, in the
expansion stage, with a classifier of its own: the task's new classes, one **backward prototype**
per old task (every old class of task i is one class for F_t) and one **forward prototype** per seen
class, which an energy-based term teaches to take the samples that the model would place in the
known classes but that are not data (short-run Langevin samples from the 180-degree rotated batch):

    L_exp = CE([z_b / tau, z_new], y') + lambda_e CE(mask([z_b, z_new, z_f](x~)), |y'| + y)

Then the fusion stage merges the modules into one classifier, the backward prototype of old task i
scaled by (1 + alpha_i) and shifted by beta_i on the old classes' rows, and learns only (alpha, beta)
on a class-balanced subset of the data and the exemplars. Losses, options and their sources:
docs/methods/beef.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.methods.base import Method, StageOptimizer
from cilkit.models.expandable import ExpandableBackbone
from cilkit.models.network import eval_mode, freeze
from cilkit.schema import param

log = logging.getLogger("cilkit")

Reduce = Literal["sample", "batch"]


# -- the energy-based terms and the targets, on plain tensors -----------------------------------------


def pseudo_targets(y: torch.Tensor, task_sizes: list[int]) -> torch.Tensor:
    """Targets of F_t's own classifier [backward prototypes of tasks 1..t-1; new classes]: an old class
    becomes the index of its task, a new class c becomes (t - 1) + (c - n_old). At t = 1: y itself."""
    if len(task_sizes) <= 1:
        return y
    n_old = sum(task_sizes[:-1])
    bounds = torch.tensor(list(_cumsum(task_sizes[:-1])), device=y.device)
    old_task = torch.bucketize(y, bounds, right=True)
    return torch.where(y >= n_old, y - n_old + len(task_sizes) - 1, old_task)


def _cumsum(sizes: list[int]):
    total = 0
    for s in sizes:
        total += s
        yield total


def forward_mass(train_logits: torch.Tensor, energy_logits: torch.Tensor) -> torch.Tensor:
    """Per sample, the softmax mass that [train logits; forward prototypes] put on the forward prototypes."""
    p = F.softmax(torch.cat([train_logits, energy_logits], 1).float(), 1)
    return p[:, train_logits.shape[1]:].sum(1)


def sgld_objective(train_logits: torch.Tensor, energy_logits: torch.Tensor, reduce: Reduce = "sample") -> torch.Tensor:
    """What each Langevin step descends: the log of the forward prototypes' mass, so that the samples move
    to where the model sees a known class. ``sample``: sum_i log m_i; ``batch`` (the official code):
    log sum_i m_i, a single mass for the whole batch (each sample's gradient divided by the batch's mass)."""
    m = forward_mass(train_logits, energy_logits)
    return m.log().sum() if reduce == "sample" else m.sum().log()


def energy_loss(train_logits: torch.Tensor, energy_logits: torch.Tensor, y: torch.Tensor, pseudo: torch.Tensor,
                mask: Reduce = "sample") -> torch.Tensor:
    """CE over [train logits; forward prototypes] with the forward prototype of the sample's class, |train| + y,
    as target. The train logit of the sample's own class (its pseudo-target) is replaced by the constant 0,
    so the term never pushes a sample away from its own class: ``sample`` masks that entry of each row;
    ``batch`` (the official code's ``logits[:, pseudo_targets]``) masks the columns of every class present in
    the batch, in every row."""
    logits = torch.cat([train_logits, energy_logits], 1).float()
    keep = torch.ones_like(logits, dtype=torch.bool)
    if mask == "sample":
        keep[torch.arange(len(y), device=y.device), pseudo] = False
    else:
        keep[:, torch.unique(pseudo)] = False
    logits = torch.where(keep, logits, torch.zeros_like(logits))
    return F.cross_entropy(logits, y + train_logits.shape[1])


def aligned(train_logits: torch.Tensor, n_back: int, tau: float) -> torch.Tensor:
    """Logits alignment: the backward prototypes' logits (the first ``n_back``) divided by tau."""
    if n_back == 0 or tau == 1.0:
        return train_logits
    return torch.cat([train_logits[:, :n_back] / tau, train_logits[:, n_back:]], 1)


# -- the classifier: F_t's prototypes during expansion, the fused classifier at inference --------------


def _linear_init(rows: int, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official SimpleLinear's initialisation: kaiming-uniform with the linear gain, U(-sqrt(3/d), sqrt(3/d)),
    and a zero bias [code]."""
    w = torch.empty(rows, cols, device=like.device, dtype=like.dtype)
    if rows and cols:
        nn.init.kaiming_uniform_(w, nonlinearity="linear")
    return w, torch.zeros(rows, device=like.device, dtype=like.dtype)


class BEEFHead(nn.Module):
    """The classifier of BEEF over the super-feature [F_1(x); ...; F_t(x)] (d features each).

    During task t it holds the fused classifier of tasks 1..t-1 (``old_weight``: n_old x (t-1)d, frozen),
    and F_t's own parts on its d features: the new classes (``new_*``), one backward prototype per old task
    (``back_*``), one forward prototype per seen class (``fwd_*``), and the fusion's (alpha, beta) per old
    task. ``forward`` gives the fused logits; ``add_classes`` folds the finished task into ``old_*``:

        old rows of task i:  W_old f_{<t} + b_old + (1 + alpha_i)(w_b,i . f_t + b_b,i) + beta_i
        new rows:            W_new f_t + b_new
    ``drop_old_bias``: the official forward's ``fc_bias=+new_fc_bias``, which leaves b_old out.
    """

    def __init__(self, d: int, drop_old_bias: bool = False):
        super().__init__()
        self.d = d
        self.drop_old_bias = drop_old_bias
        self.task_sizes: list[int] = []
        z = torch.empty(0)
        for name, shape in {"old_weight": (0, 0), "old_bias": (0,), "new_weight": (0, d), "new_bias": (0,),
                            "back_weight": (0, d), "back_bias": (0,), "fwd_weight": (0, d), "fwd_bias": (0,),
                            "alpha": (0,), "beta": (0,)}.items():
            setattr(self, name, nn.Parameter(z.new_empty(shape)))
        self.old_weight.requires_grad_(False)
        self.old_bias.requires_grad_(False)

    @property
    def n_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def n_old(self) -> int:
        return sum(self.task_sizes[:-1])

    def expansion_parameters(self) -> list[nn.Parameter]:
        """What the expansion stage trains beside F_t: the new classes and both kinds of prototypes."""
        return [self.new_weight, self.new_bias, self.back_weight, self.back_bias, self.fwd_weight, self.fwd_bias]

    def fusion_parameters(self) -> list[nn.Parameter]:
        return [self.alpha, self.beta]

    def _back_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The backward prototypes spread over the old classes' rows, scaled and shifted by (alpha, beta)."""
        sizes = torch.tensor(self.task_sizes[:-1], device=self.back_weight.device)
        scale = 1 + self.alpha
        w = (scale[:, None] * self.back_weight).repeat_interleave(sizes, 0)
        b = (scale * self.back_bias + self.beta).repeat_interleave(sizes, 0)
        return w, b

    @torch.no_grad()
    def _fold(self) -> None:
        """The finished task's fused classifier becomes ``old_*`` (n_seen rows x t*d columns)."""
        ref = self.new_weight
        if len(self.task_sizes) == 1:
            w, b = self.new_weight.detach().clone(), self.new_bias.detach().clone()
        else:
            n_old, k, cols_old = self.n_old, self.task_sizes[-1], self.old_weight.shape[1]
            w = torch.zeros(n_old + k, cols_old + self.d, device=ref.device, dtype=ref.dtype)
            bw, bb = self._back_rows()
            w[:n_old, :cols_old] = self.old_weight
            w[:n_old, cols_old:] = bw
            w[n_old:, cols_old:] = self.new_weight
            b = torch.cat([self.old_bias + bb, self.new_bias])
        self.old_weight = nn.Parameter(w, requires_grad=False)
        self.old_bias = nn.Parameter(b, requires_grad=False)

    @torch.no_grad()
    def add_classes(self, n: int) -> None:
        """Fold the finished task, then F_t's fresh parts: n new classes, t-1 backward prototypes, a forward
        prototype per seen class (the official code draws all of them anew every task), (alpha, beta) = 0."""
        if self.task_sizes:
            self._fold()
        t_old, ref = len(self.task_sizes), self.new_weight
        for prefix, rows in (("new", n), ("back", t_old), ("fwd", self.n_classes + n)):
            w, b = _linear_init(rows, self.d, ref)
            setattr(self, f"{prefix}_weight", nn.Parameter(w))
            setattr(self, f"{prefix}_bias", nn.Parameter(b))
        self.alpha = nn.Parameter(torch.zeros(t_old, device=ref.device, dtype=ref.dtype))
        self.beta = nn.Parameter(torch.zeros(t_old, device=ref.device, dtype=ref.dtype))
        self.task_sizes.append(n)

    def train_logits(self, f_new: torch.Tensor) -> torch.Tensor:
        """F_t's classifier: [backward prototypes (t-1); new classes]."""
        back = F.linear(f_new, self.back_weight, self.back_bias)
        return torch.cat([back, F.linear(f_new, self.new_weight, self.new_bias)], 1)

    def energy_logits(self, f_new: torch.Tensor) -> torch.Tensor:
        """The forward prototypes' logits (one per seen class)."""
        return F.linear(f_new, self.fwd_weight, self.fwd_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f_new = features[:, -self.d:]
        new = F.linear(f_new, self.new_weight, self.new_bias)
        if len(self.task_sizes) <= 1:
            return new
        bw, bb = self._back_rows()
        old = F.linear(features[:, : -self.d], self.old_weight, None if self.drop_old_bias else self.old_bias)
        return torch.cat([old + F.linear(f_new, bw, bb), new], 1)

    def inference_params(self) -> int:
        """Parameters of the fused classifier alone (what inference needs): n_seen x (t d) + n_seen."""
        return self.n_classes * (len(self.task_sizes) * self.d + 1)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class BEEFHyper:
    # Expansion stage (official configs/beef/cifar-50-10.json [code]).
    logits_alignment: float = param(1.7, gt=0)  # tau: backward prototypes' logits / tau (CIFAR 1.7, ImageNet 3 [code])
    energy_weight: float = param(0.01, ge=0)  # lambda_e (CIFAR 0.01, ImageNet 0.1 [code])
    sgld_steps: int = param(3, ge=1)  # sample_q's n_steps [code]
    sgld_lr: float = param(0.01, gt=0)  # its SGD step on the images [code]
    sgld_noise: float = param(0.001, ge=0)  # std of the Gaussian noise added after each step [code]
    # Per-sample terms [assumption: the paper's text was not at hand]; "batch": the official code's indexing.
    sgld_reduce: Reduce = "sample"
    energy_mask: Reduce = "sample"
    new_init: Literal["first", "previous"] = "first"  # F_t starts as F_1 (official load_state_dict of convnets[0]) [code]
    # Fusion stage (official _fusion [code]): only (alpha, beta) learn, CE on a balanced subset.
    fusion_epochs: int = param(60, ge=0)  # fusion_epochs 60 [code]
    fusion_lr: float = param(0.05, gt=0)  # hard-coded 0.05 [code]
    fusion_optimizer: StageOptimizer = "sgd"  # SGD momentum 0.9, cosine [code]
    fusion_weight_decay: float = param(5e-4, ge=0)  # the config's weight_decay [code]
    drop_old_bias: bool = False  # true: the official forward, whose bias leaves the old classifier's out [code]


class BEEF(Method):
    name = "beef"
    paper = ("Wang, Zhou, Liu, Ye, Bian, Zhan, Zhao, BEEF: Bi-Compatible Class-Incremental Learning via "
             "Energy-Based Expansion and Fusion, ICLR 2023")
    Hyper = BEEFHyper
    memory_use = "required"

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        cls.check_stage_rate("fusion_lr", hp.fusion_optimizer, hp.fusion_lr)

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        d = net.backbone.out_dim
        net.backbone = ExpandableBackbone(net.backbone)
        net.head = BEEFHead(d, drop_old_bias=hp.drop_old_bias)
        self.param_counts: list[dict] = []

    # -- structure ---------------------------------------------------------------------------

    @property
    def extractors(self) -> nn.ModuleList:
        return self.net.backbone.extractors

    def grow(self, task: Task) -> None:
        """Freeze F_1..F_{t-1}, append F_t (a copy of F_1, or of F_{t-1}), fold the fused classifier."""
        bb = self.net.backbone
        if task.index > 0:
            freeze(bb.extractors[-1])
            bb.expand(bb.extractors[0] if self.hp.new_init == "first" else bb.extractors[-1])
        self.net.add_classes(task.n_classes)

    def train_mode(self) -> None:
        """F_t and the heads train; F_1..F_{t-1} stay in eval mode."""
        self.net.train()
        for e in self.extractors[:-1]:
            e.eval()

    def param_groups(self, task: Task) -> list[dict]:
        return [{"params": list(self.extractors[-1].parameters()) + self.net.head.expansion_parameters()}]

    # -- expansion stage ------------------------------------------------------------------------

    def langevin(self, x: torch.Tensor) -> torch.Tensor:
        """Short-run Langevin samples from the 180-degree rotated batch: sgld_steps descents of
        ``sgld_objective`` on the images (F_t in eval mode, no parameter gradient), each followed by noise."""
        ext, head, hp = self.extractors[-1], self.net.head, self.hp
        xk = torch.rot90(x.detach(), 2, (2, 3))
        with eval_mode(ext), torch.enable_grad():
            for _ in range(hp.sgld_steps):
                xk.requires_grad_(True)
                f = ext(xk)["features"]
                (g,) = torch.autograd.grad(sgld_objective(head.train_logits(f), head.energy_logits(f), hp.sgld_reduce), xk)
                xk = (xk - hp.sgld_lr * g.to(xk.dtype)).detach()
                if hp.sgld_noise > 0:
                    xk = xk + hp.sgld_noise * torch.randn_like(xk)
        return xk

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_exp on F_t alone (the old extractors are frozen: their features carry no gradient)."""
        ext, head = self.extractors[-1], self.net.head
        pseudo = pseudo_targets(y, head.task_sizes)
        z = head.train_logits(ext(x)["features"])
        loss = F.cross_entropy(aligned(z, self.task.index, self.hp.logits_alignment), pseudo)
        if self.hp.energy_weight > 0:
            f = ext(self.langevin(x))["features"]
            loss = loss + self.hp.energy_weight * energy_loss(head.train_logits(f), head.energy_logits(f), y, pseudo,
                                                              self.hp.energy_mask)
        return loss

    # -- fusion stage ---------------------------------------------------------------------------

    def fusion_subset(self, task: Task) -> torch.Tensor:
        """The exemplars of the old classes plus, for each new class, as many of its samples (drawn at random)
        as the smallest old class holds (the official ``get_dataset_with_split``, samples_old_class each)."""
        old = self.memory.indices(range(self.n_old)).to(self.ctx.device)
        k = min(len(self.memory.exemplars[c]) for c in range(self.n_old))
        parts = [old]
        for c in task.classes:
            idx = self.ctx.train_data.indices_of([c]).to(self.ctx.device)
            parts.append(idx[torch.randperm(len(idx), device=idx.device)[:k]])
        return torch.cat(parts)

    def fusion_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE of the fused logits; every extractor frozen (only alpha, beta learn)."""
        with torch.no_grad():
            f = self.net.backbone(x)["features"]
        return F.cross_entropy(self.net.head(f), y)

    def fuse(self, task: Task) -> None:
        hp = self.hp
        stage = self.extra_stage(task, epochs=hp.fusion_epochs, lr=hp.fusion_lr, optimizer=hp.fusion_optimizer,
                                 schedule="cosine", milestones=[], weight_decay=hp.fusion_weight_decay)
        self.fit([{"params": self.net.head.fusion_parameters()}], self.fusion_subset(task), stage, self.fusion_loss,
                 train_mode=self.net.eval, desc="fusion")
        head = self.net.head
        log.info("BEEF: task %d fusion alpha %s beta %s", task.index + 1,
                 [round(v, 4) for v in head.alpha.tolist()], [round(v, 4) for v in head.beta.tolist()])

    def after_task(self, task: Task) -> None:
        trained = sum(p.numel() for g in self.param_groups(task) for p in g["params"])
        if task.index > 0 and self.hp.fusion_epochs > 0:
            self.fuse(task)
        self.update_memory(task)
        head = self.net.head
        extractors = sum(count_params(e) for e in self.extractors)
        counts = {"task": task.index, "extractors": len(self.extractors), "params": extractors + head.inference_params(),
                  "params_stored": count_params(self.net), "params_trainable": trained,
                  "params_fusion": head.alpha.numel() + head.beta.numel(), "exemplars": len(self.memory)}
        self.param_counts.append(counts)
        log.info("BEEF: task %d | %d extractors | %d parameters at inference (%d held) | %d trained | %d exemplars",
                 task.index + 1, counts["extractors"], counts["params"], counts["params_stored"],
                 counts["params_trainable"], counts["exemplars"])

    def task_metrics(self) -> dict:
        """The parameter counts of the task: the inference network (extractors + fused classifier), all the
        parameters held (prototypes included), the trained ones, the extractors, the exemplars."""
        last = self.param_counts[-1]
        return {"parameters": last["params"], "parameters_held": last["params_stored"],
                "parameters_trained": last["params_trainable"], "parameters_fusion": last["params_fusion"],
                "extractors": last["extractors"], "exemplars": last["exemplars"]}

    def state_dict(self) -> dict:
        return {"param_counts": [dict(c) for c in self.param_counts]}

    def load_state_dict(self, state: dict) -> None:
        self.param_counts = [dict(c) for c in state.get("param_counts", [])]

