"""Joint training: the upper bound of class-incremental learning.

"Oracle" / "Joint" in iCaRL, PyCIL and the surveys. At every task the network is trained on all the
data of every class seen so far, so nothing is forgotten for lack of data; ``reinit: true`` trains
from scratch at every task instead of continuing from the previous one.

    L = CE(z(x), y)    over all seen classes

Losses, options and their sources: docs/methods/joint.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cilkit.data.scenario import Task
from cilkit.methods.base import Method


@dataclass
class JointHyper:
    reinit: bool = False  # train from a fresh initialisation at every task


class Joint(Method):
    name = "joint"
    paper = "Upper bound: training on all data seen so far"
    Hyper = JointHyper
    fixed_head = True  # the base loss: CE over every logit

    def before_task(self, task: Task) -> None:
        if self.hp.reinit and task.index > 0:
            self.net.reset_parameters()  # every module's own initialisation, then model.init on the linear layers

    def train_indices(self, task: Task) -> torch.Tensor:
        return self.ctx.train_data.indices_of(range(task.stop))
