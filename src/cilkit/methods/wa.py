"""WA: weight aligning.

B. Zhao, X. Xiao, G. Gan, B. Zhang and S.-T. Xia, "Maintaining Discrimination and Fairness in Class
Incremental Learning", CVPR 2020. Trains with CE and distillation on the new data plus the
exemplars, keeps the classifier's weights non-negative, and after each task rescales the new
classes' weight vectors to the old classes' mean norm (no extra parameters, no validation set).

    L = (1 - lambda) CE(z(x), y) + lambda KD_T(z_{1..n}(x), z_hat_{1..n}(x));   W_new <- gamma W_new,
    gamma = mean_{k old} ||W_k|| / mean_{k new} ||W_k||

Losses, options and their sources: docs/methods/wa.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.losses import kd_loss
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.models.heads import IncrementalLinear, weight_align_gamma

log = logging.getLogger("cilkit")


@dataclass
class WAHyper:
    T: float = param(2.0, gt=0)  # KD temperature T = 2 (docs/spec.md §7.3 [code]: PyCIL T = 2)
    clip_weights: bool = True  # Zhao et al. 2020 (weight clipping): FC weights kept >= 0 [paper]; PyCIL does not clip
    fc_bias: bool = False  # Zhao et al. 2020: FC without bias (DER's config use_bias: False); True = PyCIL's FC


class WA(Method):
    name = "wa"
    paper = "Zhao et al., Maintaining Discrimination and Fairness in Class Incremental Learning, CVPR 2020"
    Hyper = WAHyper
    memory_use = "required"
    distills = True  # the previous task's model, already aligned in its after_task

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        net.head = IncrementalLinear(net.feature_dim, bias=hp.fc_bias)
        self.gammas: list[float] = []  # gamma of every aligned task, for the record

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.net(x)["logits"]
        ce = F.cross_entropy(z, y)
        if self.teacher is None:
            return ce
        lam = self.task.old_fraction  # n / (n + m)
        kd = kd_loss(z[:, : self.n_old], self.teacher.old_logits(x, self.n_old), self.hp.T)
        return (1.0 - lam) * ce + lam * kd

    @torch.no_grad()
    def after_step(self) -> None:
        """Weight clipping: the classifier's weights (not its bias) are kept non-negative."""
        if self.hp.clip_weights:
            for block in self.net.head.blocks:
                block.weight.clamp_(min=0.0)

    @torch.no_grad()
    def align_weights(self, task: Task) -> float:
        """Rescale the new classes' rows so that their mean norm is the old classes' one."""
        gamma = weight_align_gamma(self.net.head.weight[: task.stop], self.n_old)
        self.net.head.blocks[task.index].weight.mul_(gamma)
        return gamma

    def after_task(self, task: Task) -> None:
        if task.index > 0:
            gamma = self.align_weights(task)
            self.gammas.append(gamma)
            log.info("WA: task %d gamma %.4f", task.index + 1, gamma)
        super().after_task(task)

    def state_dict(self) -> dict:
        return {"gammas": list(self.gammas)}

    def load_state_dict(self, state: dict) -> None:
        self.gammas = list(state.get("gammas", []))
