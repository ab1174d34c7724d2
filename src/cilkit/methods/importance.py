"""What EWC, online EWC, SI and MAS share: cross-entropy over all seen classes plus an importance-weighted
quadratic penalty towards earlier tasks' parameters, exemplar-free.

    L = CE(z_{1..n_seen}(x), y) + w * sum_t sum_i Omega^t_i (theta_i - theta^t*_i)^2

``terms`` holds the (anchor theta^t*, importance Omega^t) pairs: one per earlier task (EWC), or one
running pair (online EWC, SI, MAS); ``penalty_weight`` is the method's w. Anchors and importances are
float32 tensors on the device, saved in ``state_dict`` (a checkpoint loads with ``weights_only=True``)
so a resumed run goes on exactly as an uninterrupted one. A parameter created after an anchor (a new
head block) is not penalised; see :mod:`cilkit.losses.quadratic`.

:meth:`per_sample_mean` is the data pass of EWC's Fisher and MAS's importance: the task's training
samples under test-time transforms, the network in eval mode (BatchNorm with its running statistics,
so each sample's output depends on that sample only), each sample's gradient taken on its own with
``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), in float32 (autocast off).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cilkit.data.scenario import Task
from cilkit.losses.quadratic import Params, per_sample_sums, quadratic_penalty, snapshot
from cilkit.methods.base import Method


class QuadraticPenaltyMethod(Method):
    """Base of the parameter-regularisation methods (not registered: it has no ``name``)."""

    memory_use = "none"
    fixed_head = True  # CE over every logit; the penalty covers every row of a fixed head (all anchored)

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        self.terms: list[tuple[Params, Params]] = []  # (anchor, importance) pairs, oldest first

    # -- the loss ---------------------------------------------------------------------------------

    def penalty_weight(self) -> float:
        """The factor in front of the sum of the quadratic terms."""
        raise NotImplementedError

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of the current task alone: cross-entropy over all seen classes (single head)."""
        return F.cross_entropy(self.net(x)["logits"], y)

    def penalty(self) -> torch.Tensor:
        """w * sum over the terms of sum_i Omega_i (theta_i - theta*_i)^2 (float32)."""
        params = dict(self.net.named_parameters())
        return self.penalty_weight() * sum(quadratic_penalty(params, a, w) for a, w in self.terms)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.task_loss(x, y)
        if self.terms and self.penalty_weight() > 0:
            loss = loss + self.penalty()
        return loss

    def anchor(self) -> Params:
        """theta*: the trainable parameters as they are now."""
        return snapshot(self.trainable().items())

    # -- importances from the task's data -----------------------------------------------------------

    def task_samples(self, task: Task, limit: int | None) -> torch.Tensor:
        """The task's training indices, or ``limit`` of them drawn without replacement (a generator seeded
        by the run's seed and the task, so the training's random stream is left as it is)."""
        idx = self.ctx.train_data.indices_of(task.classes)
        if limit is None or limit >= len(idx):
            return idx
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + task.index)
        pick = torch.randperm(len(idx), generator=gen)[:limit].sort().values
        return idx[pick.to(idx.device)]

    def per_sample_mean(self, indices: torch.Tensor, objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        reduce: Callable[[torch.Tensor], torch.Tensor], chunk: int,
                        targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Params:
        """(1/N) sum_k reduce(d objective(z(x_k), t_k) / d theta) over the samples ``indices``.

        ``objective(logits, target)`` is a scalar of one sample's logits (over every seen class);
        ``targets(x, y)`` gives each sample's target from the batch and its true labels (the labels by
        default; EWC's sampled Fisher draws them from the model). One gradient per sample (see the module).
        """
        params = {n: p.detach() for n, p in self.trainable().items()}
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        labels = self.ctx.train_data.labels
        net = self.net

        def one(p: Params, x1: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
            return objective(functional_call(net, p, (x1.unsqueeze(0),))["logits"][0].float(), t1)

        pos = 0

        def visit(x: torch.Tensor) -> dict:
            nonlocal pos
            y = labels[indices[pos : pos + len(x)].to(labels.device)].to(x.device)
            pos += len(x)
            with torch.autocast(x.device.type, enabled=False):
                x = x.float()
                t = targets(x, y) if targets is not None else y
                for name, s in per_sample_sums(one, params, (x, t), reduce, chunk).items():
                    sums[name] += s
            return {"features": x.new_zeros(len(x), 0)}

        # the context's feature pass is the one way to the training images under test transforms, in order
        self.features(indices, forward=visit)
        return {n: s / max(len(indices), 1) for n, s in sums.items()}

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"anchors": [dict(a) for a, _ in self.terms], "importances": [dict(w) for _, w in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.terms = [({n: t.to(dev) for n, t in a.items()}, {n: t.to(dev) for n, t in w.items()})
                      for a, w in zip(state.get("anchors", []), state.get("importances", []))]
