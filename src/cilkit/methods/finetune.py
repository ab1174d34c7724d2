"""Finetune: the lower bound of class-incremental learning.

Each task trains the same network on the new classes' data only, with no memory and no teacher,
so old classes are forgotten (McCloskey & Cohen, 1989; the "Finetune" baseline of iCaRL,
Rebuffi et al., CVPR 2017, and PyCIL). Loss on a batch of new data:

    L = CE(z_{1:|C_{1:t}|}(x), y)                      (ce_mask = "all", the canonical form)
    L = CE(z_{|C_{1:t-1}|+1 : |C_{1:t}|}(x), y - |C_{1:t-1}|)   (ce_mask = "new", PyCIL's variant)

With ``ce_mask: new`` the old rows of the classifier receive no gradient; only the backbone drifts.
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

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return masked_ce(self.net(x)["logits"], y, self.n_old, self.hp.ce_mask)
