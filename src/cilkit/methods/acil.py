"""ACIL and DS-AL: analytic class-incremental learning, exemplar-free, with closed-form classifiers.

ACIL: Huiping Zhuang, Zhenyu Weng, Hongxin Wei, Renchunzi Xie, Kar-Ann Toh, Zhiping Lin, "ACIL: Analytic
Class-Incremental Learning with Absolute Memorization and Privacy Protection", NeurIPS 2022, pp. 11602-11614.
DS-AL: Huiping Zhuang, Run He, Kai Tong, Ziqian Zeng, Cen Chen, Zhiping Lin, "DS-AL: A Dual-Stream Analytic
Learning for Exemplar-Free Class-Incremental Learning", AAAI 2024, 38(15), pp. 17237-17244.
Official code of both: github.com/ZHUANGHP/Analytic-continual-learning (``analytic/``).

The first task trains the network with cross-entropy by backpropagation (the config's schedule). Then the
backbone is frozen for good; a fixed random buffer layer expands its features (width ``buffer_size``) and
a linear classifier is solved by ridge regression on the first task's data (ACIL's re-alignment, Eq. 4).
Every later task updates it recursively (Woodbury, Eq. 9-10) from that task's data only, so that it
equals the joint least-squares solution on all the data seen so far:

    X = act(f(x) W_fe)      W = (sum_k X_k^T X_k + gamma I)^{-1} [X_0^T Y_0, ..., X_t^T Y_t]

DS-AL adds a compensation stream: a second ridge classifier on act_C(f(x) W_fe), fitted to the main
stream's residues Y - X_M W_M on the new classes' columns (previous label cleansing), and predicts
X_M W_M + C X_C W_C. The shared recursive least squares: :mod:`cilkit.models.analytic`.

How it fits the task loop: the closed-form fits run in ``after_task`` on eval-mode backbone features of
the task's training images under test transforms (``Method.features``), the first task's after its
backpropagation. From the second task on, ``stage`` gives the main training zero epochs, so the shared
loop draws no batch and steps nothing, and ``before_task`` turns the backbone's gradients off; the
network's own linear head is trained on the first task only (the BP base training) and is not used for
prediction. The buffer layer and the classifiers are buffers of ``net.analytic``: on the device with the
network and in its checkpoint.

Equations, options and their sources: docs/methods/acil.md, docs/methods/ds-al.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.methods.base import Method
from cilkit.models.analytic import ACTIVATIONS, RandomBuffer, RecursiveLeastSquares, row_blocks
from cilkit.schema import param
from cilkit.training.stage import Stage

log = logging.getLogger("cilkit")

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "none"]


@dataclass
class ACILHyper:
    buffer_size: int = param(8192, ge=1)  # d_fe: "8k" on CIFAR-100, 15k on ImageNet (paper, Table 1 caption); code 8192
    gamma: float = param(0.1, gt=0)  # gamma: 0.1 (paper Table 2: gives Table 1's 66.30; official README: 0.1)
    activation: Activation = "relu"  # f_act of the buffer: ReLU (paper §3.1, Eq. 2; code: torch.relu_)
    buffer_init: Literal["normal", "uniform"] = "normal"  # W_fe ~ N(0,1) (paper §3.1); uniform: nn.Linear's init (code)
    rls_batch: int = param(4096, ge=1)  # rows per recursive update (official README: --IL-batch-size 4096); no effect on ACIL


@dataclass
class DSALHyper(ACILHyper):
    gamma_comp: float = param(0.1, gt=0)  # gamma of the compensation stream (official README and config: 0.1)
    compensation_ratio: float = param(1.0, ge=0)  # C: code default 1; README: best 0.6 on CIFAR-100, 1.5 on ImageNet-1k
    activation_comp: Activation = "tanh"  # sigma_C (official DSAL.py: torch.tanh); sigma_M is `activation` (ReLU)
    # residues Y - X_M W_M with the main stream updated on the whole task (paper, suppl. Algorithm 1), or on each
    # block of rls_batch rows as it comes (official DSAL.fit, called per mini-batch)
    residue: Literal["task", "batch"] = "task"


class ACIL(Method):
    name = "acil"
    paper = ("Zhuang, Weng, Wei, Xie, Toh, Lin, ACIL: Analytic Class-Incremental Learning with Absolute Memorization "
             "and Privacy Protection, NeurIPS 2022")
    Hyper = ACILHyper
    memory_use = "none"  # exemplar-free: the past lives in R and W only

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        # On the network: moved to the device with it and saved in its state_dict (the checkpoint).
        net.analytic = self.build_classifier(net.feature_dim)

    def build_classifier(self, feature_dim: int) -> nn.ModuleDict:
        """The fixed buffer layer (seeded with the run's seed) and the main stream's classifier."""
        return nn.ModuleDict({
            "buffer": RandomBuffer(feature_dim, self.hp.buffer_size, init=self.hp.buffer_init, seed=self.ctx.seed),
            "main": RecursiveLeastSquares(self.hp.buffer_size, self.hp.gamma),
        })

    @property
    def streams(self) -> list[RecursiveLeastSquares]:
        return [m for k, m in self.net.analytic.items() if k != "buffer"]

    # -- the loop: BP on the first task, nothing to train afterwards ----------------------------------

    def grow(self, task: Task) -> None:
        super().grow(task)  # the network's own head: trained on the first task (the BP base training)
        for rls in self.streams:
            rls.add_classes(task.n_classes)

    def stage(self, task: Task) -> Stage:
        """The configured stage on the first task; zero epochs afterwards (the backbone is frozen)."""
        stage = super().stage(task)
        return stage if task.index == 0 else stage.replace(epochs=0)

    def before_task(self, task: Task) -> None:
        if task.index > 0:
            self.net.backbone.requires_grad_(False)

    def after_task(self, task: Task) -> None:
        """The closed-form fit on the task's data: re-alignment after the first task, recursion after the others."""
        idx = self.ctx.train_data.indices_of(task.classes)
        f = self.features(idx, forward=self.net.backbone)
        labels = self.ctx.train_data.labels[idx.to(self.ctx.train_data.labels.device)].to(f.device).long()
        Y = F.one_hot(labels, task.stop).to(torch.float64)
        with torch.autocast(f.device.type, enabled=False):
            self.fit_analytic(f, Y, task)
        log.info("%s task %d: closed-form update on %d samples (buffer %d, %d classes)", self.name, task.index + 1,
                 len(idx), self.hp.buffer_size, task.stop)

    # -- the analytic classifier -------------------------------------------------------------------------

    def expand(self, f: torch.Tensor) -> torch.Tensor:
        """f(x) W_fe, float64 (before the activation)."""
        return self.net.analytic["buffer"](f)

    def fit_analytic(self, f: torch.Tensor, Y: torch.Tensor, task: Task) -> None:
        """ACIL: X = act(f W_fe), W and R updated with the task's rows (blocks of ``rls_batch``)."""
        act, main = ACTIVATIONS[self.hp.activation], self.net.analytic["main"]
        for rows in row_blocks(len(f), self.hp.rls_batch):
            main.update(act(self.expand(f[rows])), Y[rows])

    def analytic_logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.net.analytic["main"](ACTIVATIONS[self.hp.activation](self.expand(f)))

    def inference(self, x: torch.Tensor) -> dict:
        """The analytic classifier's logits over the seen classes; the backbone's features."""
        f = self.net.backbone(x)["features"]
        with torch.autocast(f.device.type, enabled=False):
            logits = self.analytic_logits(f.float())
        return {"logits": logits.float(), "features": f}

    def task_metrics(self) -> dict:
        """The network's parameter count and the classifier's stored float64 elements (buffer, W, R)."""
        return {**super().task_metrics(), "analytic_elements": sum(b.numel() for b in self.net.analytic.buffers())}


class DSAL(ACIL):
    name = "ds-al"
    paper = ("Zhuang, He, Tong, Zeng, Chen, Lin, DS-AL: A Dual-Stream Analytic Learning for Exemplar-Free "
             "Class-Incremental Learning, AAAI 2024")
    Hyper = DSALHyper

    def build_classifier(self, feature_dim: int) -> nn.ModuleDict:
        classifier = super().build_classifier(feature_dim)
        classifier["comp"] = RecursiveLeastSquares(self.hp.buffer_size, self.hp.gamma_comp)
        return classifier

    def fit_analytic(self, f: torch.Tensor, Y: torch.Tensor, task: Task) -> None:
        """The main stream as ACIL, then the compensation stream on the cleansed residues (DS-AL Eq. 13-17)."""
        blocks = row_blocks(len(f), self.hp.rls_batch)
        if self.hp.residue == "task":
            super().fit_analytic(f, Y, task)  # W_M^(k) on the whole task first
            for rows in blocks:
                self.fit_compensation(self.expand(f[rows]), Y[rows], task)
        else:  # the official code: each block updates the main stream, then gives its residues at once
            for rows in blocks:
                z = self.expand(f[rows])
                self.net.analytic["main"].update(ACTIVATIONS[self.hp.activation](z), Y[rows])
                self.fit_compensation(z, Y[rows], task)

    def residues(self, z: torch.Tensor, Y: torch.Tensor, task: Task) -> torch.Tensor:
        """Y - X_M W_M with the old classes' columns set to 0 (previous label cleansing, Eq. 15)."""
        res = Y - self.net.analytic["main"](ACTIVATIONS[self.hp.activation](z))
        res[:, : task.start] = 0
        return res

    def fit_compensation(self, z: torch.Tensor, Y: torch.Tensor, task: Task) -> None:
        self.net.analytic["comp"].update(ACTIVATIONS[self.hp.activation_comp](z), self.residues(z, Y, task))

    def analytic_logits(self, f: torch.Tensor) -> torch.Tensor:
        z = self.expand(f)
        main = self.net.analytic["main"](ACTIVATIONS[self.hp.activation](z))
        return main + self.hp.compensation_ratio * self.net.analytic["comp"](ACTIVATIONS[self.hp.activation_comp](z))
