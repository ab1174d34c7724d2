"""The incremental network: a backbone and a classifier head that grows task by task (or, with
``head="fixed"``, has a row for every class of the scenario from the start).

``init`` chooses the initialisation of the network's ``nn.Linear`` layers: ``"torch"`` keeps PyTorch's
default; ``"xavier"`` is Mammoth's (its backbones' ``xavier``): every weight uniform in [-a, a] with
a = sqrt(6 / (fan_in + fan_out)) (``nn.init.xavier_uniform_``, gain 1) and every bias 0. It reaches
every ``nn.Linear`` of the network: the MLP's layers, the linear head (and each block of rows a later
task adds), and the linear modules a method adds when it is built (the experiment calls
:meth:`IncrementalNet.apply_init` once more then). Convolutions, cosine heads (their rows are
``Parameter`` blocks, not ``nn.Linear``) and DER's expanding head keep their own initialisation, as
Mammoth's ResNet-18 keeps PyTorch's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from cilkit.models.backbones import build_backbone
from cilkit.models.heads import FixedLinear, IncrementalLinear

HEADS = ("growing", "fixed")  # model.head
INITS = ("torch", "xavier")  # model.init


@torch.no_grad()
def xavier_(linear: nn.Linear) -> None:
    """Mammoth's ``xavier``: the weight uniform in [-a, a], a = sqrt(6 / (fan_in + fan_out)); the bias 0."""
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class IncrementalNet(nn.Module):
    """Backbone + growing head. ``forward`` returns ``{"logits", "features", "maps"}``.

    The head has a row per seen class (growing), or per class of the scenario (:class:`FixedLinear`):
    then the logits have all the scenario's columns from the first task, while ``task_sizes``,
    ``n_classes`` (the classes seen so far) and ``task_slice`` count the tasks as for a growing head.
    ``init``: the initialisation of every ``nn.Linear`` (module docstring).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init '{init}' is not one of {', '.join(INITS)}")
        self.backbone = backbone
        self.head = head if head is not None else IncrementalLinear(backbone.out_dim)
        self.task_sizes: list[int] = []
        self.init = init
        self.apply_init()

    @property
    def n_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    @property
    def fixed_head(self) -> bool:
        """Whether the head has a row for every class of the scenario from the start (``model.head: fixed``)."""
        return isinstance(self.head, FixedLinear)

    def add_classes(self, n: int) -> None:
        """Add ``n`` outputs for a new task; the old rows are kept as they are (the new ones get ``init``)."""
        before = {id(m) for m in self.head.modules()}
        self.head.add_classes(n)
        self.task_sizes.append(n)
        self.apply_init([m for m in self.head.modules() if id(m) not in before])

    def apply_init(self, modules=None) -> None:
        """Give every ``nn.Linear`` among ``modules`` (default: the network's) that ``init`` has not reached
        yet its initialisation; those it did are left as they are. Nothing for ``init="torch"``."""
        if self.init == "torch":
            return
        for m in self.modules() if modules is None else modules:
            if isinstance(m, nn.Linear) and not getattr(m, "_cilkit_init", False):
                xavier_(m)
                m._cilkit_init = True

    def reset_parameters(self) -> None:
        """A fresh initialisation of every module (``reset_parameters``), then ``init`` on every ``nn.Linear``."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, nn.Linear):
                m._cilkit_init = False
        self.apply_init()

    def task_slice(self, task: int) -> slice:
        """Logit columns of task ``task``."""
        start = sum(self.task_sizes[:task])
        return slice(start, start + self.task_sizes[task])

    def forward(self, x: torch.Tensor) -> dict:
        out = self.backbone(x)
        out["logits"] = self.head(out["features"])
        return out


def build_network(backbone: str, in_shape: tuple[int, int, int], *, head: str = "growing", n_classes: int | None = None,
                  init: str = "torch", **backbone_kwargs) -> IncrementalNet:
    """The network of ``backbone`` for inputs of ``in_shape``; ``head``: ``"growing"`` (a block of rows per
    task) or ``"fixed"`` (``n_classes`` rows, the scenario's classes, from the start); ``init``: ``INITS``."""
    if head not in HEADS:
        raise ValueError(f"head '{head}' is not one of {', '.join(HEADS)}")
    bb = build_backbone(backbone, in_shape, **backbone_kwargs)
    if head == "fixed":
        if not n_classes:
            raise ValueError("a fixed head needs the scenario's number of classes (n_classes)")
        return IncrementalNet(bb, FixedLinear(bb.out_dim, n_classes), init=init)
    return IncrementalNet(bb, init=init)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for ``module`` from now on; the gradients it holds (its last step's) are dropped."""
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None
    return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (the teacher of distillation methods)."""
    return freeze(copy.deepcopy(module).eval())


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode for the block; every submodule's previous mode is restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
