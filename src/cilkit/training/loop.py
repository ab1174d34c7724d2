"""The one training loop of cilkit, and where it is (:class:`StepInfo`).

:func:`fit` trains parameter groups for a stage's epochs over a set of training indices: each epoch's
index batches come from ``batches``, every batch is drawn from the store and augmented as a whole on
the device, and ``loss(x, y)`` gives the loss to minimise. It knows no method: the hooks a method
changes (batching, train mode, a step callback) are arguments. Every stage of every method (main
training, warm-ups, balanced finetuning, bias correction, re-learning) runs through it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cilkit.errors import CilkitError
from cilkit.training.progress import Progress
from cilkit.training.runtime import Runtime
from cilkit.training.stage import OptimizerState, Stage, build_optimizer, build_scheduler

Batches = Callable[[torch.Tensor, int], list[torch.Tensor]]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingDiverged(CilkitError):
    """The training loss became NaN or infinite: the stage stops, nothing of it is saved."""


@dataclass
class StepInfo:
    """Where the loop is: the stage being trained, its epoch and the step within the epoch (0-based).

    Updated in place by :func:`fit` before every ``loss`` call, so a loss can depend on the position
    (DER's mask annealing within an epoch, COIL's epoch-dependent weights).
    """

    stage: str = ""
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    indices: torch.Tensor | None = None  # the training indices of the step's batch (a stream memory takes them in)


def shuffled_batches(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """One epoch's batches: a shuffled pass over ``indices``; a last batch of one sample is dropped
    (BatchNorm cannot train on it)."""
    order = indices[torch.randperm(len(indices), device=indices.device)]
    plan = list(order.split(batch_size))
    if len(plan) > 1 and len(plan[-1]) < 2:
        plan.pop()
    return plan


def fit(
    runtime: Runtime,
    groups: list[dict],
    indices: torch.Tensor,
    stage: Stage,
    loss: Loss,
    *,
    batches: Batches = shuffled_batches,
    train_mode: Callable[[], None] = lambda: None,
    before_step: Callable[[], None] = lambda: None,
    after_step: Callable[[], None] = lambda: None,
    at: StepInfo | None = None,
    progress: Progress | None = None,
    desc: str = "",
    optimizer_state: OptimizerState | None = None,
) -> dict:
    """Train ``groups`` for ``stage.epochs`` epochs over the training samples ``indices``.

    ``train_mode()`` is called at the start of every epoch (it sets the modules' modes for the
    stage), ``before_step()`` between the backward pass and the optimizer step (the gradients are
    in ``.grad``: GEM's projection), ``after_step()`` after every optimizer step; ``at`` is kept up to date.
    ``optimizer_state``: the new optimizer starts from its kept state, and it keeps the optimizer's state at
    the end (``train.keep_optimizer``). Returns the images seen, the time taken and the throughput.
    """
    at = at if at is not None else StepInfo()
    progress = progress or Progress("off")
    plan = batches(indices, stage.batch_size)
    if len(plan) == 0:
        raise RuntimeError(f"{desc}: {len(indices)} training samples are too few for a batch")
    optimizer = build_optimizer(groups, stage)
    if optimizer_state is not None:
        optimizer_state.restore(optimizer)
    scheduler = build_scheduler(optimizer, stage, len(plan))
    at.stage, at.epochs = desc, stage.epochs
    progress.start_stage(desc, stage.epochs)
    seen, start = 0, time.perf_counter()
    for epoch in range(stage.epochs):
        train_mode()
        if epoch > 0:
            plan = batches(indices, stage.batch_size)
        at.epoch, at.steps = epoch, len(plan)
        progress.start_epoch(epoch, len(plan))
        t0, total, n_epoch = time.perf_counter(), torch.zeros((), device=runtime.device), 0
        for step, idx in enumerate(plan):
            at.step, at.indices = step, idx
            x, y = runtime.train_batch(idx, stage.augment)
            with runtime.autocast():
                value = loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            before_step()
            optimizer.step()
            scheduler.step()
            after_step()
            total += value.detach().float()
            n_epoch += len(y)
            progress.step()
        seen += n_epoch
        rate = n_epoch / (time.perf_counter() - t0)
        mean = total.item() / len(plan)  # the epoch's one host sync
        if not math.isfinite(mean):
            progress.end_stage()
            raise TrainingDiverged(
                f"{desc}, epoch {epoch + 1}: the training loss became {mean} (diverged; learning rate {stage.lr:g}, "
                f"optimizer {stage.optimizer}); lower the learning rate (train.lr) and run again"
            )
        progress.end_epoch(epoch, stage.epochs, mean, optimizer.param_groups[0]["lr"], rate)
    progress.end_stage()
    if optimizer_state is not None:
        optimizer_state.keep(optimizer)
    seconds = time.perf_counter() - start
    return {"images": seen, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
