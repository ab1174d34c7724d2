"""SS-IL: Separated Softmax for Incremental Learning.

H. Ahn, J. Kwak, S. Lim, H. Bang, H. Kim and T. Moon, "SS-IL: Separated Softmax for Incremental
Learning", ICCV 2021. Official code: hongjoon0805/SS-IL-Official. New-class samples get a softmax
over the new classes and exemplars one over the old classes; the previous model is distilled task
by task; every mini-batch holds a fixed number of exemplars; task index t trains at lr / (t + 1).

    L = L_CE-SS + sum_{s<t} T^2 KL( softmax(z^{t-1}_{C_s}(x)/T) || softmax(z_{C_s}(x)/T) )

Losses, options and their sources: docs/methods/ssil.md
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
