"""The incremental network: a backbone and a classifier head that grows task by task."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from cilkit.models.backbones import build_backbone
from cilkit.models.heads import IncrementalLinear


class IncrementalNet(nn.Module):
    """Backbone + growing head. ``forward`` returns ``{"logits", "features", "maps"}``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else IncrementalLinear(backbone.out_dim)
        self.task_sizes: list[int] = []

    @property
    def n_classes(self) -> int:
        return sum(self.task_sizes)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    def add_classes(self, n: int) -> None:
        """Add ``n`` outputs for a new task; the old rows are kept as they are."""
        self.head.add_classes(n)
        self.task_sizes.append(n)

    def task_slice(self, task: int) -> slice:
        """Logit columns of task ``task``."""
        start = sum(self.task_sizes[:task])
        return slice(start, start + self.task_sizes[task])

    def forward(self, x: torch.Tensor) -> dict:
        out = self.backbone(x)
        out["logits"] = self.head(out["features"])
        return out


def build_network(backbone: str, in_shape: tuple[int, int, int], **backbone_kwargs) -> IncrementalNet:
    return IncrementalNet(build_backbone(backbone, in_shape, **backbone_kwargs))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients (the teacher of distillation methods)."""
    teacher = copy.deepcopy(module).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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
