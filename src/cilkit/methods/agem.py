"""A-GEM: Averaged Gradient Episodic Memory.

A. Chaudhry, M. Ranzato, M. Rohrbach and M. Elhoseiny, "Efficient Lifelong Learning with A-GEM",
ICLR 2019. Official code: facebookresearch/agem (``model/model.py``, ``fc_permute_mnist.py``,
``conv_split_cifar.py``). GEM's one constraint per earlier task becomes one constraint on the
average loss over the whole episodic memory, estimated at every step on a random batch of it
(``replay_batch_size`` exemplars, 256 in the paper and the official ``--eps-mem-batch``):

    g_ref = grad of CE on the memory batch
    g~ = g                                          if <g, g_ref> >= 0
    g~ = g - (<g, g_ref> / <g_ref, g_ref>) g_ref      otherwise

A closed form: no solver. Plain SGD (``plain_sgd``), as for GEM.
Losses, options and their sources: docs/methods/gem.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cilkit.methods.gem import EpisodicProjection, Outputs
from cilkit.schema import param


def project_agem(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection: ``g`` itself when <g, g_ref> >= 0, else g minus its component along g_ref."""
    dot = torch.dot(g, g_ref)
    if bool(dot >= 0):
        return g
    return g - (dot / torch.dot(g_ref, g_ref)) * g_ref


@dataclass
class AGEMHyper:
    # exemplars of the reference batch, drawn anew every step without replacement from the whole
    # memory (all of it when smaller): 256, the official EPS_MEM_BATCH_SIZE (--eps-mem-batch)
    replay_batch_size: int = param(256, ge=1)
    # seen: CE over all seen classes (class-incremental; official permuted MNIST is single-head);
    # task: each loss over its own task's classes (official Split CIFAR/CUB/AWA masks)
    outputs: Outputs = "seen"
    # SGD without momentum and weight decay, so that the step is the projected gradient (official
    # replicate_results_iclr19.sh: --optim SGD, tf.train.GradientDescentOptimizer); false: the config's
    plain_sgd: bool = True


class AGEM(EpisodicProjection):
    """Chaudhry, Ranzato, Rohrbach & Elhoseiny, Efficient Lifelong Learning with A-GEM, ICLR 2019.
    One constraint on a random memory batch, projected in closed form: docs/methods/gem.md."""

    name = "agem"
    paper = "Chaudhry, Ranzato, Rohrbach & Elhoseiny, Efficient Lifelong Learning with A-GEM, ICLR 2019"
    Hyper = AGEMHyper

    def memory_part(self) -> list[torch.Tensor]:
        """A random batch of the memory (every earlier task's exemplars), without replacement."""
        memory = self.memory.indices(range(self.n_old))
        return [memory[torch.randperm(len(memory))[: self.hp.replay_batch_size]]]

    def project(self, g, x, y, params):
        return project_agem(g, self.memory_gradient(x, y, params))
