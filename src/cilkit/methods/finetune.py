"""Finetune: the lower bound of class-incremental learning.

The "Finetune" baseline of Rebuffi et al., "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017, and of PyCIL (catastrophic forgetting: McCloskey & Cohen, 1989). Each task
trains the same network on the new classes' data only, with no memory and no teacher, so the old
classes are forgotten.

    L = CE(z_{1:|C_{1:t}|}(x), y)      (ce_mask: all; "new" takes the new classes' logits only, as PyCIL)

Losses, options and their sources: docs/methods/finetune.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilkit.losses import masked_ce
from cilkit.methods.base import Method


@dataclass
class FinetuneHyper:
    ce_mask: Literal["all", "new"] = "all"  # "all": CE over every seen class; "new": new classes only (PyCIL)


class Finetune(Method):
    name = "finetune"
    paper = "Lower bound: finetuning on each task's data (baseline in Rebuffi et al., iCaRL, CVPR 2017)"
    Hyper = FinetuneHyper
    fixed_head = True  # a fixed head: "all" is the CE over every class of the scenario (Mammoth's sgd)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return masked_ce(self.net(x)["logits"], y, self.n_old, self.hp.ce_mask, self.task.stop)
