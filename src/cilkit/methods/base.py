"""The method interface: the hooks through which a method changes the shared task loop.

The task driver (:mod:`cilkit.driver`) runs every task the same way::

    grow(task)              # structure only: new head rows, new modules (replayed on resume)
    teacher = the previous model, when the method distils (``distills = True``)
    before_task(task)       # data-dependent initialisation, validation splits, warm-ups
    fit(param_groups(task), train_indices(task), stage(task), loss)   # the one training loop
    after_task(task)        # post-processing, extra stages, exemplar selection
    teacher dropped; NME class means refreshed by the driver
    evaluate(inference)     # logits (CNN) and features (NME) of the seen classes

A method overrides only the hooks where its paper differs from this loop, and reaches the runtime
only through its :class:`Context`. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from cilkit.data.scenario import Task
from cilkit.data.store import ImageStore
from cilkit.errors import ConfigError
from cilkit.memory.exemplars import ExemplarMemory, repeat_to
from cilkit.models.network import IncrementalNet, eval_mode, frozen_copy
from cilkit.schema import from_dict
from cilkit.training.loop import StepInfo, shuffled_batches
from cilkit.training.stage import Stage

MemoryUse = Literal["required", "optional", "none"]
StageOptimizer = Literal["sgd", "adam", "adamw"]
ADAM_MAX_LR = 0.01  # above this an Adam step diverges in practice (its usual rates are 1e-4 to 1e-3)
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Context(Protocol):
    """What a method may use of the runtime: the data, the memory, the loop and feature extraction.

    Implemented by :class:`cilkit.training.context.TrainingContext`; tests pass small fakes.
    """

    device: torch.device
    seed: int  # the run's seed (for a method's own seeded routines, e.g. k-means)
    train_data: ImageStore  # ``labels``, ``indices_of(classes)``, ``batch(idx)``
    memory: ExemplarMemory | None  # the exemplar memory, when the method keeps one
    at: StepInfo  # where the loop is (stage, epoch, step), updated before every loss call

    def stage(self, task: Task) -> Stage:
        """The configured stage (epochs, optimizer, schedule) of ``task``."""

    def fit(self, groups: list[dict], indices: torch.Tensor, stage: Stage, loss: Loss, *,
            batches: Callable, train_mode: Callable[[], None], after_step: Callable[[], None],
            before_step: Callable[[], None] = ..., desc: str = "", main: bool = False) -> dict:
        """The training loop (:func:`cilkit.training.loop.fit`); ``main``: the task's main training (which
        continues the previous task's optimizer state under ``train.keep_optimizer``)."""

    def features(self, indices: torch.Tensor, forward: Callable[[torch.Tensor], dict], *, flip: bool = False,
                 transform: Callable | None = None) -> torch.Tensor:
        """``forward(x)["features"]`` of training samples under test-time transforms."""

    def batch(self, indices: torch.Tensor, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch of ``indices`` (augmented like the loop's batches, or test-transformed)."""


class Teacher:
    """The frozen model of the previous task (a deep copy in eval mode), run without gradients."""

    def __init__(self, module: torch.nn.Module):
        self.module = frozen_copy(module)

    def __call__(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            return self.module(x)

    def old_logits(self, x: torch.Tensor, n_old: int) -> torch.Tensor:
        """The teacher's logits over the ``n_old`` classes it knew."""
        return self(x)["logits"][:, :n_old]

    def backbone(self, x: torch.Tensor) -> dict:
        """The teacher's backbone output (features and stage maps) only."""
        with torch.no_grad():
            return self.module.backbone(x)


@dataclasses.dataclass
class NoHyper:
    """A method without hyperparameters of its own."""


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Hyper: ClassVar[type] = NoHyper
    # required: keeps exemplars (and reports NME); optional: keeps them when the budget is not 0; none:
    # exemplar-free, a budget given by the user is refused
    memory_use: ClassVar[MemoryUse] = "none"
    distills: ClassVar[bool] = False  # a Teacher of the previous model exists during every task after the first
    backbone_options: ClassVar[dict] = {}  # e.g. {"last_relu": False} for a signed embedding (UCIR, PODNet)
    # the memory.selection rules the method works with, its default first: herding / random select a
    # task's exemplars after it, reservoir / balanced fill a stream memory as the data passes
    selections: ClassVar[tuple[str, ...]] = ("herding", "random")
    fixed_head: ClassVar[bool] = False  # works on plain logits, so also with model.head: fixed (a row per class from the start)
    default_head: ClassVar[str] = "growing"  # the head that model.head: auto gives

    def __init__(self, hp, net: IncrementalNet, ctx: Context):
        """A method with another classifier replaces ``net.head`` here, before any class exists."""
        self.hp = hp
        self.net = net
        self.ctx = ctx
        self.task: Task | None = None
        self.teacher: Teacher | None = None

    # -- configuration, checked before any data is read -------------------------------------------

    @classmethod
    def parse_args(cls, args: dict):
        """The typed hyperparameters from ``method_args``; unknown keys and bad values are config errors."""
        try:
            return from_dict(cls.Hyper, args or {}, "method_args.")
        except ConfigError as e:
            if "unknown key" in e.message:
                names = [f.name for f in dataclasses.fields(cls.Hyper)] or ["(none)"]
                raise ConfigError(e.field, f"unknown key for method '{cls.name}'; allowed: {', '.join(names)}") from None
            raise

    @classmethod
    def needs_maps(cls, hp) -> bool:
        """Whether the method reads the backbone's convolutional feature maps (the MLP has none)."""
        return False

    @classmethod
    def check_config(cls, cfg: Any, hp) -> None:
        """Method-specific checks of the whole config (e.g. an option it cannot combine); raise ConfigError."""

    @classmethod
    def validate(cls, cfg: Any, budget_given: str | None = None):
        """Every check of the method's settings: its arguments, its use of memory and of the backbone.

        ``budget_given`` names the memory key the user set (``size`` or ``per_class``), if any.
        Returns the parsed hyperparameters.
        """
        hp = cls.parse_args(cfg.method_args)
        if budget_given and cls.memory_use == "none":
            raise ConfigError(f"memory.{budget_given}", f"method '{cls.name}' keeps no exemplars: remove the memory budget")
        if cls.needs_maps(hp) and cfg.model.backbone == "mlp":
            raise ConfigError(
                "model.backbone",
                f"'mlp' has no convolutional feature maps, which method '{cls.name}' reads with these settings; "
                "use a convolutional backbone: convnet, resnet32, resnet18 or resnet18_cifar",
            )
        if cfg.model.head == "auto":
            cfg.model.head = cls.default_head
        if cfg.model.head == "fixed" and not cls.fixed_head:
            raise ConfigError("model.head", f"method '{cls.name}' needs the growing head (it works on the classifier's "
                              "per-task blocks of rows or on the seen classes' logits only); use model.head: growing")
        if cls.memory_use == "required":
            if cfg.memory.per_class is not None:
                if cfg.memory.per_class <= 0:
                    raise ConfigError("memory.per_class", f"must be a positive number, got {cfg.memory.per_class}")
            elif cfg.memory.size is None or cfg.memory.size <= 0:
                raise ConfigError("memory.size", f"method '{cls.name}' keeps exemplars: give a positive budget, got {cfg.memory.size}")
        if cls.memory_use != "none":
            if cfg.memory.selection == "auto":
                cfg.memory.selection = cls.selections[0]
            elif cfg.memory.selection not in cls.selections:
                raise ConfigError("memory.selection", f"method '{cls.name}' works with the memory rules "
                                  f"{', '.join(cls.selections)}; got '{cfg.memory.selection}'")
        cls.check_config(cfg, hp)
        return hp

    @classmethod
    def backbone_kwargs(cls, hp) -> dict:
        """Keyword arguments of the backbone the method needs (``backbone_options``, or from its hyperparameters)."""
        return dict(cls.backbone_options)

    @classmethod
    def hyper_defaults(cls) -> dict:
        hints = typing.get_type_hints(cls.Hyper)
        return {f.name: (hints[f.name], getattr(cls.Hyper(), f.name)) for f in dataclasses.fields(cls.Hyper)}

    # -- what the method knows of the run -------------------------------------------------------

    @property
    def memory(self) -> ExemplarMemory | None:
        return self.ctx.memory

    @property
    def n_old(self) -> int:
        """Classes seen before the current task."""
        return self.task.start if self.task is not None else 0

    @property
    def at(self) -> StepInfo:
        """Where the training loop is (stage, epoch, step of the epoch)."""
        return self.ctx.at

    # -- hooks ---------------------------------------------------------------------------------

    def grow(self, task: Task) -> None:
        """Add the task's classes to the network. Structure only: the driver replays it on resume."""
        self.net.add_classes(task.n_classes)

    def distilled(self) -> torch.nn.Module:
        """The module the teacher copies (the network; BiC adds its bias layers)."""
        return self.net

    def before_task(self, task: Task) -> None:
        """Called after ``grow`` (and the teacher's creation) and before training on ``task``."""

    def train_indices(self, task: Task) -> torch.Tensor:
        """Training-set indices of the task: its new data, plus the old classes' exemplars when there is
        a memory (repeated to ``memory.replay_ratio`` times the new data when that is set)."""
        new = self.ctx.train_data.indices_of(task.classes)
        if self.memory is None or len(self.memory) == 0:
            return new
        old = self.memory.indices(range(self.n_old)).to(new.device)  # a stream memory may hold new classes too
        if self.memory.replay_ratio is not None:
            old = repeat_to(old, round(self.memory.replay_ratio * len(new)))
        return torch.cat([new, old])

    def stage(self, task: Task) -> Stage:
        """Epochs, optimizer and schedule of the task's training (the config's by default)."""
        return self.ctx.stage(task)

    def epoch_batches(self, indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """One epoch's batches of training indices: a shuffled pass (SS-IL's fixed replay ratio overrides it)."""
        return shuffled_batches(indices, batch_size)

    def param_groups(self, task: Task) -> list[dict]:
        """Optimizer parameter groups; all trainable parameters of the network by default."""
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def train_mode(self) -> None:
        """The modules' modes during the task's training, set at the start of every epoch."""
        self.net.train()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one augmented batch: cross-entropy over all seen classes."""
        return F.cross_entropy(self.net(x)["logits"], y)

    def before_step(self) -> None:
        """Called between the backward pass and the optimizer step (e.g. a gradient projection)."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. weight clipping)."""

    def observe(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """After each step of the task's main training, in its first epoch (so that every sample is
        offered once): a stream memory takes in the batch's new data (exemplars riding along in the
        batch are not the stream). Dark Experience Replay overrides it to store logits too."""
        if self.memory is not None and getattr(self.memory, "streaming", False):
            self.memory.observe(indices, labels, mask=self.stream_part(labels))

    def stream_part(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Which samples of a training batch are the stream (the task's new data), or None when all are:
        exemplars mixed into the task's data are not offered again."""
        return labels >= self.n_old if self.n_old > 0 else None

    def after_task(self, task: Task) -> None:
        """Called after training on ``task``; selects the new classes' exemplars when there is a memory."""
        if self.memory is not None:
            self.update_memory(task)

    def inference(self, x: torch.Tensor) -> dict:
        """``{"logits", "features"}`` of a normalised test batch, in eval mode."""
        return self.net(x)

    def task_metrics(self) -> dict:
        """Figures recorded with each task's results (the network's parameter count by default)."""
        return {"parameters": sum(p.numel() for p in self.net.parameters())}

    # -- state beyond the network's parameters, for checkpoints ----------------------------------

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- the task's lifetime, called by the driver ------------------------------------------------

    def start_task(self, task: Task) -> None:
        """The teacher of a distilling method: the model as it was after the previous task."""
        self.teacher = Teacher(self.distilled()) if self.distills and task.index > 0 else None

    def end_task(self, task: Task) -> None:
        self.teacher = None

    # -- shared parts -------------------------------------------------------------------------

    def fit(self, groups: list[dict], indices: torch.Tensor, stage: Stage, loss: Loss, *,
            train_mode: Callable[[], None] | None = None, desc: str = "", stream: bool = False) -> dict:
        """Run the training loop with this method's batching and step hook (and ``train_mode``, the
        modes of the stage: the method's own by default). ``stream``: the task's main training, whose
        batches a stream memory observes (:meth:`observe`) and whose optimizer may continue the previous
        task's (``train.keep_optimizer``)."""
        after_step = self.after_step
        if stream and self.memory is not None and getattr(self.memory, "streaming", False):
            def after_step() -> None:
                self.after_step()
                if self.at.epoch == 0:
                    idx = self.at.indices
                    self.observe(idx, self.ctx.train_data.labels[idx.to(self.ctx.train_data.labels.device)])
        return self.ctx.fit(groups, indices, stage, loss, batches=self.epoch_batches, train_mode=train_mode or self.train_mode,
                            before_step=self.before_step, after_step=after_step, desc=desc, main=stream)

    def memory_batch(self, n: int, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` exemplars drawn uniformly without replacement from the whole memory (all when fewer):
        (images, labels, positions); with a stream memory the positions address its payload."""
        idx, pos = self.memory.sample(n)
        x, y = self.ctx.batch(idx, augment)
        return x, y, pos

    def extra_stage(self, task: Task, *, epochs: int, lr: float, optimizer: str, **changes) -> Stage:
        """The stage of an extra training phase (finetuning, re-learning): the task's stage with the
        phase's own epochs, rate and optimizer, which never follow ``train.optimizer`` silently."""
        return self.stage(task).replace(epochs=epochs, lr=lr, optimizer=optimizer, **changes)

    @staticmethod
    def check_stage_rate(field: str, optimizer: str, lr: float) -> None:
        """Refuse a rate that makes no sense for the stage's optimizer (an SGD-scale rate given to Adam)."""
        if optimizer in ("adam", "adamw") and lr > ADAM_MAX_LR:
            raise ConfigError(f"method_args.{field}", f"{lr:g} is an SGD-scale rate but this stage's optimizer is {optimizer}; "
                              f"Adam rates are about 1e-4 to 1e-3 (at most {ADAM_MAX_LR:g} here), or set the stage's optimizer to sgd")

    def frozen_backbone_mode(self) -> None:
        """Train mode for an extra stage that trains a head on a fixed backbone (BatchNorm frozen)."""
        self.net.train()
        self.net.backbone.eval()

    def features(self, indices: torch.Tensor, flip: bool = False, transform: Callable | None = None,
                 forward: Callable[[torch.Tensor], dict] | None = None) -> torch.Tensor:
        """Eval-mode features (``inference`` by default) of training samples under test transforms."""
        if len(indices) == 0:
            return torch.empty(0, self.net.feature_dim, device=self.ctx.device)
        with eval_mode(self.net):
            return self.ctx.features(indices, forward or self.inference, flip=flip, transform=transform)

    def class_features(self, c: int) -> torch.Tensor:
        """Features of every training image of class ``c``."""
        return self.features(self.ctx.train_data.indices_of([c]))

    def update_memory(self, task: Task) -> None:
        """Shrink the old classes' exemplars to the new quota, then select the new classes' (herding
        with the current model)."""
        self.memory.update(task.classes, lambda c: self.ctx.train_data.indices_of([c]), self.features)

    def balanced_finetune(self, params: list, stage: Stage, loss: Loss | None = None,
                          train_mode: Callable[[], None] | None = None) -> dict:
        """Class-balanced finetuning of ``params`` on the exemplar memory (UCIR, PODNet, DER).

        Call it after :meth:`update_memory`, so that every seen class, new ones included, holds the
        same number of exemplars. The backbone stays in eval mode (BatchNorm statistics frozen).
        """
        return self.fit([{"params": params}], self.memory.indices().to(self.ctx.device), stage, loss or self.loss,
                        train_mode=train_mode or self.frozen_backbone_mode, desc="balanced finetuning")
