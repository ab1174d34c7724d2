"""SI: synaptic intelligence, in its class-incremental form (one growing head, no exemplars).

F. Zenke, B. Poole and S. Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
During task mu every step adds each parameter's share of the loss decrease, the path integral of
Sec. 3 (Eq. 3) taken along the optimizer's actual steps,

    omega_i += -g_i * delta_theta_i,     g = d L_mu / d theta (the task's loss, without the surrogate),

and after the task (Eq. 5) Omega_i += omega_i / ((Delta_i)^2 + xi), Delta_i = theta_i(end of mu) -
theta_i(start of mu), summed over tasks. From the next task on (Eq. 4)

    L = CE(z_{1..n_seen}(x), y) + c * sum_i Omega_i (theta_i - theta*_i)^2,   theta* = the previous task's end.

The gradient is read in ``before_step``/``after_step``: ``.grad`` holds the gradient of the whole loss
(CE + surrogate); with ``omega_grad: task`` (the paper's) the surrogate's exact gradient 2 c Omega
(theta - theta*) is subtracted from it, giving the task loss's gradient without a second backward pass.

Losses, options and their sources: docs/methods/si.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.data.scenario import Task
from cilkit.losses.quadratic import Params, accumulate, penalty_gradient
from cilkit.methods.importance import QuadraticPenaltyMethod
from cilkit.schema import param


@dataclass
class SIHyper:
    c: float = param(1.0, ge=0)  # split MNIST c = 1 (official pathint split-MNIST notebook, cvals [0, 1.0]); Mammoth's Seq-MNIST best c = 1.0
    # damping: Mammoth's Seq-MNIST best xi = 0.9 (class-IL with SGD, as cilkit trains). The paper's split-MNIST 1e-3 (official
    # notebook, with Adam) diverges under SGD on cilkit's default digits config (task 4) and on fmnist (task 2): docs/methods/si.md
    xi: float = param(0.9, gt=0)
    omega_grad: Literal["task", "total"] = "task"  # task: the loss without the surrogate (paper; pathint, Mammoth, FACIL); total: .grad as is (van de Ven's code)
    nonnegative: bool = False  # clamp the accumulated Omega at 0 (pathint applies a relu); the paper's Eq. 5 has none


class SI(QuadraticPenaltyMethod):
    name = "si"
    paper = "Zenke, Poole & Ganguli, Continual Learning Through Synaptic Intelligence, ICML 2017"
    Hyper = SIHyper

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.start: Params = {}  # theta at the start of the current task (new head rows included)
        self.omega: Params = {}  # the current task's running path integral
        self.before: Params = {}  # theta before the current step

    def penalty_weight(self) -> float:
        return self.hp.c

    def before_task(self, task: Task) -> None:
        self.start = self.anchor()
        self.omega = {n: torch.zeros_like(p) for n, p in self.start.items()}
        self.before = {}

    @torch.no_grad()
    def before_step(self) -> None:
        """The parameters the step starts from (the gradient in ``.grad`` was taken there)."""
        self.before = {n: p.detach().float().clone() for n, p in self.trainable().items()}

    @torch.no_grad()
    def after_step(self) -> None:
        """omega_i -= g_i * (theta_i after the step - theta_i before it)."""
        params = self.trainable()
        surrogate = {}
        if self.hp.omega_grad == "task" and self.terms and self.hp.c > 0:
            anchor, importance = self.terms[0]
            surrogate = penalty_gradient(self.before, anchor, {n: w for n, w in importance.items() if n in self.before})
        for name, p in params.items():
            if p.grad is None or name not in self.omega:
                continue
            g = p.grad.float()
            if name in surrogate:
                g = g - self.hp.c * surrogate[name]
            self.omega[name] -= g * (p.detach().float() - self.before[name])

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        end = self.anchor()
        new = {n: self.omega[n] / ((end[n] - self.start[n]) ** 2 + self.hp.xi) for n in self.omega}
        total = accumulate(self.terms[0][1] if self.terms else None, new)
        if self.hp.nonnegative:
            total = {n: w.clamp_min(0.0) for n, w in total.items()}
        self.terms = [(end, total)]
        self.start, self.omega, self.before = {}, {}, {}

