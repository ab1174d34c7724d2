"""The context a method is handed: the runtime's data and loop, the memory, the configured stages.

:class:`TrainingContext` implements :class:`cilkit.methods.base.Context` (the protocol a method may
rely on); it is built by the experiment and holds nothing a method could use to reach the driver.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cilkit.data.scenario import Task
from cilkit.data.store import ImageStore
from cilkit.memory.exemplars import ExemplarMemory
from cilkit.training.loop import StepInfo, fit
from cilkit.training.progress import Progress
from cilkit.training.runtime import Runtime
from cilkit.training.stage import OptimizerState, Stage


class TrainingContext:
    def __init__(self, runtime: Runtime, memory: ExemplarMemory | None, seed: int,
                 stage_of: Callable[[int], Stage], progress: Progress | None = None,
                 optimizer_state: OptimizerState | None = None):
        """``optimizer_state``: the optimizer state carried from each task's main training into the next
        (``train.keep_optimizer``; None: every stage starts a fresh optimizer)."""
        self.runtime = runtime
        self.memory = memory
        self.seed = seed
        self.at = StepInfo()
        self.progress = progress or Progress("off")
        self._stage_of = stage_of
        self.optimizer_state = optimizer_state

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def train_data(self) -> ImageStore:
        return self.runtime.train_data

    def stage(self, task: Task) -> Stage:
        return self._stage_of(task.index)

    def fit(self, groups, indices, stage, loss, *, batches, train_mode, after_step, before_step=lambda: None,
            desc: str = "", main: bool = False) -> dict:
        """The loop; ``main``: a task's main training, the only stage that continues the kept optimizer state
        (extra stages train other parameters at other rates: they start fresh)."""
        return fit(self.runtime, groups, indices, stage, loss, batches=batches, train_mode=train_mode,
                   before_step=before_step, after_step=after_step, at=self.at, progress=self.progress, desc=desc,
                   optimizer_state=self.optimizer_state if main else None)

    def batch(self, indices, augment: bool = True):
        return self.runtime.train_batch(indices, augment)

    def features(self, indices, forward, *, flip: bool = False, transform=None) -> torch.Tensor:
        return self.runtime.features(indices, forward, flip=flip, transform=transform)
