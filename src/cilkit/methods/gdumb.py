"""GDumb: a greedy class-balanced sampler and a dumb learner retrained from scratch on the memory.

A. Prabhu, P. H. S. Torr and P. K. Dokania, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV 2020. Official code: drimpossible/GDumb (``src/main.py``, ``src/opts.py``,
``src/utils.py``, ``scripts/replicate.sh``). GDumb never trains on the stream. At every task:

    sampler:  each sample of the task, in a seeded random order, offered to the memory (K slots):
              stored while there is room; once full, a sample of a class holding fewer than K / |Y_seen|
              slots replaces a random sample of a largest class, any other is dropped
    learner:  the network re-initialised, then trained on the memory alone: SGD (lr 0.05, momentum 0.9,
              weight decay 1e-6), batches of 16, one epoch at 0.005 then SGDR (cycles of 1, 2, 4, ...
              epochs, 0.05 down to 0.0005), gradients clipped to norm 10, CutMix (p 0.5, alpha 1)
    test:     the logits of classes absent from the memory masked (evaluation is over the seen classes)

No teacher, no distillation: nothing of the previous model survives the re-initialisation.
Sampler, learner, options and their sources: docs/methods/gdumb.md
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.base import Method
from cilkit.schema import param
from cilkit.training.stage import Stage


@dataclass
class GDumbHyper:
    # passes over the memory at every task: official --num_passes 256 (CIFAR, SVHN with cutmix; 128 on MNIST)
    epochs: int = param(256, ge=1)
    lr: float = param(0.05, gt=0)  # official --maxlr
    min_lr: float = param(0.0005, ge=0)  # official --minlr: the floor of every SGDR cycle
    warm_start: bool = True  # the first epoch at 0.1 lr, SGDR from the second (official main.py)
    batch_size: int = param(16, ge=2)  # official --batch_size
    momentum: float = param(0.9, ge=0, lt=1)  # official optim.SGD(momentum=0.9)
    weight_decay: float = param(1e-6, ge=0)  # official --weight_decay
    clip: float | None = param(10.0, gt=0)  # max L2 norm of all the gradients (official --clip); null: none
    cutmix_prob: float = param(0.5, ge=0, le=1)  # CutMix on a batch with this probability (official --cutmix_prob); 0: off
    cutmix_alpha: float = param(1.0, gt=0)  # lambda ~ Beta(alpha, alpha) (official --cutmix_alpha)


def derived_seed(*values: int) -> int:
    """A 63-bit seed mixed from ``values`` (the run's seed, the task, a purpose)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al., ICCV 2019) on the whole batch, as GDumb's ``cutmix_data``: lambda ~ Beta(alpha,
    alpha), a box of side sqrt(1 - lambda) times the image's, centred uniformly and clipped to the image,
    pasted from a shuffled copy of the batch; lambda becomes the share of the image left unpasted.
    Returns (mixed images, the pasted images' labels, lambda): the loss is
    lambda CE(z, y) + (1 - lambda) CE(z, y_b)."""
    n, _, h, w = x.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(n, device=x.device)
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y1, y2 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x1, x2 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return x, y[perm], lam


class GDumb(Method):
    """Prabhu, Torr & Dokania, GDumb, ECCV 2020: the task's data passes a greedy class-balanced sampler,
    then the network is re-initialised and trained on the memory alone. docs/methods/gdumb.md"""

    name = "gdumb"
    paper = "Prabhu, Torr & Dokania, GDumb: A Simple Approach that Questions Our Progress in Continual Learning, ECCV 2020"
    Hyper = GDumbHyper
    memory_use = "required"
    selections = ("balanced", "reservoir")
    fixed_head = True  # plain cross-entropy on the memory; the official network has a row per class of the run

    def __init__(self, hp, net, ctx):
        super().__init__(hp, net, ctx)
        # the backbone's initialisation as built (the builder's own init and model.init), restored at every task
        self._backbone_init = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
        self._absent: torch.Tensor | None = None  # columns of classes not in memory, masked at test time

    @classmethod
    def check_config(cls, cfg, hp) -> None:
        if hp.min_lr > hp.lr:
            raise ConfigError("method_args.min_lr", f"{hp.min_lr:g} is above method_args.lr ({hp.lr:g}): each SGDR cycle "
                              "anneals from lr down to min_lr")
        if cfg.train.keep_optimizer:
            raise ConfigError("train.keep_optimizer", "gdumb re-initialises the network at every task and trains it from "
                              "scratch: an optimizer state carried from the previous task has nothing to continue; "
                              "set it to false")
        if cfg.memory.replay_ratio is not None:
            raise ConfigError("memory.replay_ratio", "gdumb trains on the memory alone (no new data to balance it "
                              "against): remove it")

    # -- the sampler -------------------------------------------------------------------------------

    def before_task(self, task: Task) -> None:
        """The task's samples pass the sampler in a seeded random order; then the network is re-initialised."""
        data = self.ctx.train_data
        new = data.indices_of(task.classes)
        order = torch.randperm(len(new), generator=torch.Generator().manual_seed(derived_seed(self.ctx.seed, task.index, 0)))
        stream = new[order.to(new.device)]
        self.memory.observe(stream, data.labels[stream.to(data.labels.device)])
        self.reinitialise(task)
        n = task.stop if not self.net.fixed_head else self.net.head.n_classes
        absent = torch.ones(n, dtype=torch.bool)
        absent[torch.tensor([c for c in self.memory.classes if c < n], dtype=torch.long)] = False
        self._absent = absent.to(self.ctx.device) if bool(absent[: task.stop].any()) else None

    def observe(self, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """Nothing: the sampler has seen the task in :meth:`before_task` (GDumb never trains on the stream)."""

    # -- the learner ------------------------------------------------------------------------------

    @torch.no_grad()
    def reinitialise(self, task: Task) -> None:
        """Every parameter afresh: the backbone as it was built, the head by each module's ``reset_parameters``
        (and ``model.init``) under a seed of the run's seed and the task, so nothing depends on the past."""
        self.net.backbone.load_state_dict(self._backbone_init)
        head = list(self.net.head.modules())
        device = next(self.net.head.parameters()).device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(derived_seed(self.ctx.seed, task.index, 1))
            for m in head:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if isinstance(m, nn.Linear):
                    m._cilkit_init = False  # model.init (xavier) reaches it again
            self.net.apply_init(head)

    def train_indices(self, task: Task) -> torch.Tensor:
        """The memory alone, every seen class in it."""
        return self.memory.indices().to(self.ctx.device)

    def stage(self, task: Task) -> Stage:
        """GDumb's own schedule (not the config's epochs, rate, optimizer or batch size)."""
        hp = self.hp
        return self.ctx.stage(task).replace(
            epochs=hp.epochs, lr=hp.lr, optimizer="sgd", momentum=hp.momentum, weight_decay=hp.weight_decay,
            schedule="sgdr", min_lr=hp.min_lr, warmup_epochs=1 if hp.warm_start else 0, batch_size=hp.batch_size,
            milestones=[],
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the network's logits, on a CutMix batch with probability ``cutmix_prob``."""
        if self.hp.cutmix_prob > 0 and float(torch.rand(())) < self.hp.cutmix_prob:
            x, y_b, lam = cutmix(x, y, self.hp.cutmix_alpha)
            z = self.net(x)["logits"].float()
            return lam * F.cross_entropy(z, y) + (1.0 - lam) * F.cross_entropy(z, y_b)
        return F.cross_entropy(self.net(x)["logits"].float(), y)

    def before_step(self) -> None:
        """Clip the gradients' joint L2 norm (official ``clip_grad_norm_(model.parameters(), 10)``)."""
        if self.hp.clip is not None:
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.grad is not None], self.hp.clip)

    # -- test time --------------------------------------------------------------------------------

    def inference(self, x: torch.Tensor) -> dict:
        """The network's output, with the logits of the classes absent from the memory at their lowest."""
        out = self.net(x)
        if self._absent is not None:
            z = out["logits"]
            out["logits"] = z.masked_fill(self._absent[: z.shape[1]], torch.finfo(z.dtype).min)
        return out

    def task_metrics(self) -> dict:
        """The parameter count, and the fewest and most samples a seen class holds in the memory (0: absent)."""
        held = self.memory.exemplars
        counts = [len(held.get(c, ())) for c in range(self.task.stop)] if self.task is not None else [0]
        return {**super().task_metrics(), "memory_min_per_class": min(counts), "memory_max_per_class": max(counts)}
