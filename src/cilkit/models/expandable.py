"""Model parts that grow in width task by task: a backbone of several extractors whose features are
concatenated (DER's super-feature), the same on a shared trunk (MEMO's generalized blocks, with a
specialized block per task), and a classifier that grows in rows and columns."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class ExpandingLinear(nn.Module):
    """The classifier H_t over the super-feature: |C_{1:t}| rows x (t*d) columns.

    ``in_dim`` is raised by the method before ``add_classes(n)``, which builds the larger matrix:
    with ``reuse_old`` the old rows keep their weights on the old columns and get zeros on the new
    ones (the old logits start unchanged); the new rows get nn.Linear's default initialisation.
    Without ``reuse_old`` the whole matrix is new (the official code's ``reuse_oldfc: False``).
    """

    def __init__(self, in_dim: int, bias: bool = False, reuse_old: bool = True):
        super().__init__()
        self.in_dim = in_dim
        self.reuse_old = reuse_old
        self.weight = nn.Parameter(torch.empty(0, in_dim))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def _fresh(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ref = self.weight
        w = torch.empty(rows, self.in_dim, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        b = None
        if self.bias is not None:
            b = torch.empty(rows, device=ref.device, dtype=ref.dtype).uniform_(-1 / math.sqrt(self.in_dim), 1 / math.sqrt(self.in_dim))
        return w, b

    @torch.no_grad()
    def add_classes(self, n: int) -> None:
        n_old, old_in = self.weight.shape
        w, b = self._fresh(n_old + n)
        if self.reuse_old and n_old:
            w[:n_old] = 0.0
            w[:n_old, :old_in] = self.weight
            if b is not None:
                b[:n_old] = self.bias
        self.weight = nn.Parameter(w)
        if b is not None:
            self.bias = nn.Parameter(b)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w, b = self._fresh(self.n_classes)
        self.weight.copy_(w)
        if b is not None:
            self.bias.copy_(b)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


class ExpandableBackbone(nn.Module):
    """Phi_t = [F_1; ...; F_t]: the super-feature is the concatenation of every extractor's features.

    ``forward`` returns ``{"features": concat, "maps": the newest extractor's maps}``; ``out_dim``
    is the sum of the extractors' dimensions (IncrementalNet.feature_dim reads it).
    """

    def __init__(self, first: nn.Module):
        super().__init__()
        self.extractors = nn.ModuleList([first])

    @property
    def out_dim(self) -> int:
        return sum(e.out_dim for e in self.extractors)

    @property
    def dims(self) -> list[int]:
        return [e.out_dim for e in self.extractors]

    def expand(self, template: nn.Module | None = None) -> nn.Module:
        """Append F_t, a trainable copy of ``template`` (default F_{t-1}) without its forward hooks.

        A method that wraps its extractors (DER's channel masks) passes the plain network.
        """
        new = copy.deepcopy(self.extractors[-1] if template is None else template)
        for m in new.modules():
            m._forward_hooks.clear()
        if getattr(new, "_compiled_call_impl", None) is not None:  # train.compile: compile the copy anew
            new._compiled_call_impl = None
            new.compile(dynamic=False)
        for p in new.parameters():
            p.requires_grad_(True)
        self.extractors.append(new)
        return new

    def forward(self, x: torch.Tensor) -> dict:
        outs = [e(x) for e in self.extractors]
        return {"features": torch.cat([o["features"] for o in outs], 1), "maps": outs[-1]["maps"]}


class SharedExpandableBackbone(ExpandableBackbone):
    """MEMO's backbone: generalized blocks phi_g shared by every task, and a specialized block per task,
    phi(x) = [phi_s1(phi_g(x)); ...; phi_st(phi_g(x))].

    The specialized blocks are the ``extractors`` (``expand`` appends a copy of the newest, ``out_dim`` is
    the sum of their dimensions); ``generalized`` runs once per batch. ``forward`` returns
    ``{"features": concat, "maps": phi_g's maps + the newest specialized block's}``. Build the two parts
    with :func:`cilkit.models.backbones.split_backbone`.
    """

    def __init__(self, generalized: nn.Module, first: nn.Module):
        super().__init__(first)
        self.generalized = generalized

    def forward(self, x: torch.Tensor) -> dict:
        g = self.generalized(x)
        outs = [e(g["map"]) for e in self.extractors]
        return {"features": torch.cat([o["features"] for o in outs], 1), "maps": g["maps"] + outs[-1]["maps"]}
