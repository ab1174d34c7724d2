"""MAS: memory aware synapses, in its class-incremental form (one growing head, no exemplars).

R. Aljundi, F. Babiloni, M. Elhoseiny, M. Rohrbach and T. Tuytelaars, "Memory Aware Synapses: Learning
what (not) to forget", ECCV 2018. After each task the importance of every parameter is the mean, over
the task's samples, of the magnitude of the gradient of the squared L2 norm of the network's output
(Sec. 4, Eqs. 2 and 4; no labels needed):

    Omega^t_i = (1/N) sum_k | d ||z(x_k)||_2^2 / d theta_i |      (z: the logits of every seen class)

one gradient per sample (torch.func: vmap over grad). The importances of the tasks are summed,
Omega <- Omega + Omega^t (the official code's accumulation, MAS_utils/MAS_based_Training.py), and
every later task minimises (Eq. 3)

    L = CE(z_{1..n_seen}(x), y) + lambda * sum_i Omega_i (theta_i - theta*_i)^2,   theta* = the previous task's end.

Losses, options and their sources: docs/methods/mas.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.data.scenario import Task
from cilkit.losses.quadratic import Params, accumulate
from cilkit.methods.importance import QuadraticPenaltyMethod
from cilkit.schema import param


@dataclass
class MASHyper:
    lambda_mas: float = param(1.0, ge=0)  # Aljundi et al. 2018 (object recognition) and the official MAS.py: reg_lambda = 1; FACIL lamb 1 on a penalty with 1/2
    output_norm: Literal["squared", "l2"] = "squared"  # squared: ||z||^2 (paper Eq. 4, official code's summed MSE to 0); l2: ||z|| (FACIL)
    alpha: float | None = param(None, ge=0, le=1)  # None: Omega summed over tasks (official code); a number: FACIL's alpha Omega + (1 - alpha) Omega^t (its default 0.5)
    importance_samples: int | None = param(None, ge=1)  # samples of the task Omega is taken on; None = all (FACIL -1)
    grad_chunk: int = param(32, ge=1)  # samples differentiated at once (memory only: Omega does not depend on it)


class MAS(QuadraticPenaltyMethod):
    name = "mas"
    paper = "Aljundi et al., Memory Aware Synapses: Learning what (not) to forget, ECCV 2018"
    Hyper = MASHyper

    def penalty_weight(self) -> float:
        return self.hp.lambda_mas

    def importance(self, task: Task) -> Params:
        """Omega^t: the mean magnitude of each sample's gradient of its output's (squared) L2 norm."""
        squared = self.hp.output_norm == "squared"
        return self.per_sample_mean(
            self.task_samples(task, self.hp.importance_samples),
            objective=lambda z, _: (z * z).sum() if squared else z.norm(),
            reduce=torch.abs,
            chunk=self.hp.grad_chunk,
        )

    def after_task(self, task: Task) -> None:
        new = self.importance(task)
        old = self.terms[0][1] if self.terms else None
        if self.hp.alpha is None:
            total = accumulate(old, new)
        else:  # FACIL's fusion, whose running importance starts at 0 (so the first task's is scaled by 1 - alpha)
            a = self.hp.alpha
            total = accumulate(old, {n: (1.0 - a) * w for n, w in new.items()}, decay=a)
        self.terms = [(self.anchor(), total)]
