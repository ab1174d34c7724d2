"""Classifier heads that grow by one block of rows per task, keeping the old rows.

A head keeps its weights as a list of per-task blocks, so "the old classes' rows" and "the new
classes' rows" are always at hand (WA rescales the new block, UCIR freezes the old ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IncrementalLinear(nn.Module):
    """A linear classifier whose rows come in per-task blocks; new blocks get nn.Linear's init."""

    def __init__(self, in_dim: int, bias: bool = True):
        super().__init__()
        self.in_dim = in_dim
        self.bias = bias
        self.blocks = nn.ModuleList()

    @property
    def n_classes(self) -> int:
        return sum(b.out_features for b in self.blocks)

    def add_classes(self, n: int) -> None:
        ref = next(self.parameters(), None)
        block = nn.Linear(self.in_dim, n, bias=self.bias)
        if ref is not None:
            block.to(device=ref.device, dtype=ref.dtype)
        self.blocks.append(block)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([b.weight for b in self.blocks])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0](features)
        w = self.weight
        b = torch.cat([blk.bias for blk in self.blocks]) if self.bias else None
        return F.linear(features, w, b)


class CosineLinear(nn.Module):
    """Cosine-normalised classifier (Hou et al., UCIR, CVPR 2019, Eq. 4).

        logits_k = sigma * <w_k / ||w_k||, f / ||f||>

    The rows come in per-task blocks (``blocks[t]``) so that old blocks can be frozen; ``sigma`` is
    one learnable scale shared by all classes (``learn_scale=False`` keeps it fixed).
    ``cosine(f)`` gives the unscaled cosines (UCIR's margin-ranking loss works on them).
    """

    def __init__(self, in_dim: int, sigma: float = 1.0, learn_scale: bool = True):
        super().__init__()
        self.in_dim = in_dim
        self.blocks = nn.ParameterList()
        scale = torch.tensor(float(sigma))
        if learn_scale:
            self.sigma = nn.Parameter(scale)
        else:
            self.register_buffer("sigma", scale)

    @property
    def n_classes(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    def add_classes(self, n: int) -> None:
        ref = self.sigma
        w = torch.empty(n, self.in_dim, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(w, 0.0, 1.0 / self.in_dim**0.5)  # the direction is all that matters
        self.blocks.append(nn.Parameter(w))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.blocks))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(features)


@torch.no_grad()
def weight_align_gamma(weight: torch.Tensor, n_old: int) -> float:
    """WA's factor (Zhao et al., CVPR 2020): mean norm of the old rows over that of the new rows.

    Multiplying the new rows (``weight[n_old:]``) by it makes both mean norms equal.
    """
    norms = weight.float().norm(dim=1)
    return (norms[:n_old].mean() / norms[n_old:].mean()).item()
