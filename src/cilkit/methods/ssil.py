"""SS-IL: Separated Softmax for Incremental Learning (Ahn et al., ICCV 2021).

Reference: H. Ahn, J. Kwak, S. Lim, H. Bang, H. Kim and T. Moon, "SS-IL: Separated Softmax for
Incremental Learning", ICCV 2021 (methods-spec section 13). Official code:
hongjoon0805/SS-IL-Official (``trainer/ssil.py``, ``main.py``, ``data_handler/incremental_loader.py``).

Why: with one softmax over all seen classes, the cross-entropy of the (many) new-class samples
pushes every old logit down, which biases the classifier towards the new classes. SS-IL keeps the
new and the old classes in separate softmaxes, distils the previous model task by task, and
keeps a fixed share of exemplars in every mini-batch, so no post-hoc bias correction is needed.

Task t > 1 (index t >= 1), n_old = |C_old| classes seen before it, C_s the classes of task s.
Every mini-batch B holds B_new new-class samples and B_old exemplars (ratio-preserving replay):

    L = L_CE-SS + L_TKD

    L_CE-SS = ( sum_{(x,y) in B, y >= n_old} CE( z_{n_old..n_seen}(x), y - n_old )
              + sum_{(x,y) in B, y <  n_old} CE( z_{0..n_old}(x),      y          ) ) / (B_new + B_old)

    L_TKD   = sum_{s < t} T^2 * (1/|B|) sum_{x in B} KL( softmax(z^{t-1}_{C_s}(x)/T) || softmax(z_{C_s}(x)/T) )

z: the student's logits; z^{t-1}: the frozen model after the previous task, on the same augmented
batch, under no_grad. TKD runs on every sample of the batch, new and replayed, with one softmax
per earlier task (``distill: global``, one softmax over all old classes, is the paper's "GKD"
ablation). T = 2, no loss weights. The first task is plain CE over its logits.

Schedule: the learning rate of task index t is lr / (t + 1) (official ``main.py``); epochs and
milestones are the config's. Inference: plain argmax over all seen logits (the CNN figures are the
headline; the engine also reports NME because a memory exists, which the paper does not claim).

Batching (``epoch_batches``), from the indices ``train_indices`` gives (new data + memory, the
shared default), split by label into new (y >= n_old) and exemplars (y < n_old):

* ``epoch: new_data`` (default, the paper's "ratio-preserving mini-batches"): the epoch is one
  shuffled pass over the new data in chunks of ``batch_size`` (ceil(n_new / B) batches; the last
  may be short); every chunk gets ``replay_batch_size`` exemplars from a stream of reshuffled
  passes over the memory, so exemplars are used equally often and the memory cycles as needed.
* ``epoch: zip``: the official code. Its new-data loader is drop_last (floor(n_new / B) batches);
  its replay loader is a shuffled, drop_last loader over a virtual dataset as long as the whole
  training set whose item i is exemplar i mod |M|; the two are zipped (the epoch ends with the
  shorter, which in practice is the new-data one). The first task is drop_last too.

Memory (``memory_rule``): ``cilkit`` (default): the toolbox's memory as the protocol configures it
(herding, shrinking by prefix). ``paper``: the official rule: a fixed total K, ceil(K / n_seen) per
class, filled with the first samples of each class (store order, no herding), then one sample is
dropped from each of the largest classes until exactly K remain (ties: the latest classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.training.stage import Stage


@dataclass
class SSILHyper:
    T: float = param(2.0, gt=0)  # TKD temperature: official trainer/ssil.py, T = 2 (with the T^2 factor)
    replay_batch_size: int = param(32, ge=1)  # exemplars per batch: official README/arguments.py --replay-batch-size 32
    epoch: Literal["new_data", "zip"] = "new_data"  # epoch = a pass over the new data (paper); "zip": official code
    lr_decay_per_task: bool = True  # lr / (t + 1) for task index t (official main.py)
    distill: Literal["task", "global"] = "task"  # TKD (paper); "global": GKD, the paper's ablation
    memory_rule: Literal["cilkit", "paper"] = "cilkit"  # "paper": official ceil-then-trim, first samples


def separated_ce(logits: torch.Tensor, y: torch.Tensor, n_old: int) -> torch.Tensor:
    """L_CE-SS: new-class samples over the new logits, old-class samples over the old logits.

    Both cross-entropies are summed and divided by the whole batch size. With ``n_old == 0`` it is
    the plain cross-entropy over all logits.
    """
    logits = logits.float()
    new = y >= n_old
    ce_new = F.cross_entropy(logits[new, n_old:], y[new] - n_old, reduction="sum")
    ce_old = F.cross_entropy(logits[~new, :n_old], y[~new], reduction="sum") if n_old > 0 else 0.0
    return (ce_new + ce_old) / len(y)


def task_wise_kd(student: torch.Tensor, teacher: torch.Tensor, slices: list[slice], T: float) -> torch.Tensor:
    """L_TKD: sum over the slices (one per earlier task) of T^2 * KL(teacher || student), batchmean."""
    loss = student.new_zeros((), dtype=torch.float32)
    for sl in slices:
        log_p = F.log_softmax(student[:, sl].float() / T, dim=1)
        q = F.softmax(teacher[:, sl].detach().float() / T, dim=1)
        loss = loss + F.kl_div(log_p, q, reduction="batchmean") * (T * T)
    return loss


class SSIL(Method):
    name = "ssil"
    paper = "Ahn, Kwak, Lim, Bang, Kim & Moon, SS-IL: Separated Softmax for Incremental Learning, ICCV 2021"
    Hyper = SSILHyper
    memory_use = "required"
    distills = True  # z^{t-1}, the model after the previous task

    def stage(self, task: Task) -> Stage:
        stage = super().stage(task)
        return stage.replace(lr=stage.lr / (task.index + 1)) if self.hp.lr_decay_per_task else stage

    # -- ratio-preserving mini-batches -------------------------------------------------------------

    def epoch_batches(self, indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """One epoch: every batch is ``batch_size`` new samples + ``replay_batch_size`` exemplars."""
        labels = self.ctx.train_data.labels
        old_mask = labels[indices.to(labels.device)] < self.n_old
        old_mask = old_mask.to(indices.device)
        new, old = indices[~old_mask], indices[old_mask]
        if len(old) == 0:  # first task (or an empty memory): plain batches of new data
            if self.hp.epoch == "zip":
                return self.zip_batches(new, None, batch_size)
            return super().epoch_batches(new, batch_size)
        if self.hp.epoch == "zip":
            return self.zip_batches(new, old, batch_size)
        return self.new_data_batches(new, old, batch_size)

    def new_data_batches(self, new: torch.Tensor, old: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """ceil(n_new / B) batches; the exemplars come from reshuffled passes over the memory."""
        chunks = new[torch.randperm(len(new), device=new.device)].split(batch_size)
        r = self.hp.replay_batch_size
        n_draws = len(chunks) * r
        passes = [old[torch.randperm(len(old), device=old.device)] for _ in range(-(-n_draws // len(old)))]
        stream = torch.cat(passes)[:n_draws].split(r)
        return [torch.cat([c, s]) for c, s in zip(chunks, stream)]

    def zip_batches(self, new: torch.Tensor, old: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
        """The official zip of a drop_last new-data loader and a drop_last replay loader."""
        chunks = list(new[torch.randperm(len(new), device=new.device)].split(batch_size))
        chunks = [c for c in chunks if len(c) == batch_size]
        if old is None:
            return chunks
        r = self.hp.replay_batch_size
        # official ExemplarLoader: length = size of the training set, item i = exemplar[i % |M|]
        virtual = old[torch.randperm(len(self.ctx.train_data), device=old.device) % len(old)]
        replay = [s for s in virtual.split(r) if len(s) == r]
        return [torch.cat([c, s]) for c, s in zip(chunks, replay)]

    # -- loss ------------------------------------------------------------------------------------

    def old_slices(self) -> list[slice]:
        """Logit columns of every earlier task (TKD), or all old classes at once (GKD)."""
        if self.hp.distill == "global":
            return [slice(0, self.n_old)]
        return [self.net.task_slice(s) for s in range(self.task.index)]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.net(x)["logits"]
        if self.teacher is None:
            return F.cross_entropy(z.float(), y)
        z_old = self.teacher.old_logits(x, self.n_old)
        return separated_ce(z, y, self.n_old) + task_wise_kd(z, z_old, self.old_slices(), self.hp.T)

    # -- memory ----------------------------------------------------------------------------------

    def after_task(self, task: Task) -> None:
        if self.hp.memory_rule == "cilkit":
            return super().after_task(task)
        self.memory.update_ceil_trim(task.classes, lambda c: self.ctx.train_data.indices_of([c]))
