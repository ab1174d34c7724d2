"""ER: experience replay with a small episodic memory, a replay batch at every step.

A. Chaudhry, M. Rohrbach, M. Elhoseiny, T. Ajanthan, P. K. Dokania, P. H. S. Torr and M. Ranzato,
"On Tiny Episodic Memories in Continual Learning", arXiv:1902.10486, 2019 (Alg. 1). Every step
trains on the stream's batch B_n together with a batch B_M of the same size drawn uniformly from
the memory, as one batch; then B_n is offered to the memory (reservoir sampling by default):

    L = CE(z(x), y)  averaged over B_n ∪ B_M, over all seen classes (all the classes with a fixed head)

Unlike ``replay`` (PyCIL's, the exemplars mixed once into the task's shuffled data), the replay batch
is drawn anew at every step from the memory as it is then, current task included.
Losses, options and their sources: docs/methods/er.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.methods.base import Method
from cilkit.schema import param


@dataclass
class ERHyper:
    # exemplars replayed per step; None: the stream batch's size (the paper's |B_M| = |B_n| = 10; Mammoth's
    # minibatch_size defaults to batch_size)
    replay_batch_size: int | None = param(None, ge=1)


class StreamReplay(Method):
    """The shared part of the replay-batch methods (ER, ER-ACE, Dark Experience Replay): the task's
    training set is its new data only; the memory enters through :meth:`replay` at every step."""

    memory_use = "required"
    selections = ("reservoir", "balanced", "herding", "random")

    def train_indices(self, task: Task) -> torch.Tensor:
        return self.ctx.train_data.indices_of(task.classes)

    def stream_part(self, labels: torch.Tensor) -> None:
        """Every sample of a batch is the stream's (the memory rides in a separate replay batch): no mask,
        so the insertion needs no boolean indexing (a host sync on a GPU) at every step."""
        return None

    def replay(self, n_stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The step's replay batch (images, labels, memory positions), or None while the memory is empty."""
        if len(self.memory) == 0:
            return None
        return self.memory_batch(self.hp.replay_batch_size or n_stream)


class ER(StreamReplay):
    """Chaudhry et al., On Tiny Episodic Memories in Continual Learning, 2019: CE on the stream's batch
    and a memory batch of the same size, as one batch. docs/methods/er.md"""

    name = "er"
    paper = "Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr & Ranzato, On Tiny Episodic Memories in Continual Learning, 2019"
    Hyper = ERHyper
    fixed_head = True  # CE over every logit: with a fixed head, over all the classes (Mammoth's er)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.replay(len(y))
        if batch is not None:
            x, y = torch.cat([x, batch[0]]), torch.cat([y, batch[1]])
        return F.cross_entropy(self.net(x)["logits"].float(), y)
