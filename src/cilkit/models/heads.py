"""Classifier heads that grow by one block of rows per task, keeping the old rows.

A head keeps its weights as a list of per-task blocks, so "the old classes' rows" and "the new
classes' rows" are always at hand (WA rescales the new block, UCIR freezes the old ones).
:class:`FixedLinear` (``model.head: fixed``) is the exception: one block of a row per class of the
scenario, all there from the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cilkit.models.backbones import BasicBlock


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


class FixedLinear(nn.Linear):
    """The single head of the online-CIL papers' code (Mammoth's ER, DER, ER-ACE, GDumb; A-GEM's single
    head): one linear classifier with a row for every class of the scenario from the start, so the logits
    have all ``n_classes`` columns at every task and a cross-entropy over them also pushes the logits of
    the classes not seen yet down. ``add_classes(n)`` only hands the next ``n`` rows to a task; the rows
    come in no per-task blocks (methods that rescale, freeze or imprint a task's rows need the growing
    :class:`IncrementalLinear`). nn.Linear's initialisation (or the network's ``init``)."""

    def __init__(self, in_dim: int, n_classes: int, bias: bool = True):
        super().__init__(in_dim, n_classes, bias=bias)
        self.in_dim = in_dim
        self.assigned = 0  # rows handed to the tasks so far (the network's n_classes)

    @property
    def n_classes(self) -> int:
        return self.out_features

    def add_classes(self, n: int) -> None:
        if self.assigned + n > self.out_features:
            raise ValueError(f"a fixed head of {self.out_features} classes cannot take {n} more after {self.assigned}")
        self.assigned += n


class CosineLinear(nn.Module):
    """Cosine-normalised classifier (Hou et al., UCIR, CVPR 2019, Eq. 4).

        logits_k = sigma * <w_k / ||w_k||, f / ||f||>

    The rows come in per-task blocks (``blocks[t]``) so that old blocks can be frozen; ``sigma`` is
    one learnable scale shared by all classes (``learn_scale=False`` keeps it fixed).
    ``cosine(f)`` gives the unscaled cosines of every row (UCIR's margin-ranking loss works on them).
    With ``proxies = K`` each class has K rows (class-major); subclasses merge them (PODNet's LSC).
    """

    def __init__(self, in_dim: int, sigma: float = 1.0, learn_scale: bool = True, proxies: int = 1):
        super().__init__()
        self.in_dim = in_dim
        self.proxies = proxies
        self.blocks = nn.ParameterList()
        scale = torch.tensor(float(sigma))
        if learn_scale:
            self.sigma = nn.Parameter(scale)
        else:
            self.register_buffer("sigma", scale)

    @property
    def n_classes(self) -> int:
        return sum(b.shape[0] for b in self.blocks) // self.proxies

    def add_classes(self, n: int) -> None:
        ref = self.sigma
        w = torch.empty(n * self.proxies, self.in_dim, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(w, 0.0, 1.0 / self.in_dim**0.5)  # the direction is all that matters
        self.blocks.append(nn.Parameter(w))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.blocks))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(features)


class LocalSimilarityClassifier(CosineLinear):
    """PODNet's cosine classifier with ``K`` proxies per class (Douillard et al., ECCV 2020, Sec. 3.2).

        s_{c,k}(h) = < theta_{c,k} / ||theta_{c,k}||, h / ||h|| >
        yhat_c(h)  = sum_k softmax_k(s_{c,.})_k * s_{c,k}

    ``forward`` returns the merged similarities ``yhat`` (their argmax is the prediction); the scale
    ``eta`` (the base class's learnable scale) is left to the NCA loss. ``similarity="neg_sq_distance"``
    uses the official code's ``-||h_bar - theta_bar||^2 = 2 s - 2`` instead of the cosine.
    """

    def __init__(self, in_dim: int, proxies: int = 10, eta: float = 1.0, similarity: str = "cosine", learn_eta: bool = True):
        super().__init__(in_dim, sigma=eta, learn_scale=learn_eta, proxies=proxies)
        self.similarity = similarity

    @property
    def eta(self) -> torch.Tensor:
        return self.sigma

    def proxy_similarities(self, features: torch.Tensor) -> torch.Tensor:
        """``s`` of shape (B, classes, K)."""
        s = self.cosine(features)
        if self.similarity == "neg_sq_distance":
            s = -(2.0 - 2.0 * s).clamp_min(0.0)
        return s.unflatten(1, (-1, self.proxies))  # not view(len(features), ...): a trace (export) keeps the batch free

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        s = self.proxy_similarities(features)
        return (F.softmax(s, dim=2) * s).sum(2)


def mean_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The mean L2 norm of the rows of ``weight`` (computed in float32)."""
    return weight.float().norm(dim=1).mean()


@torch.no_grad()
def weight_align_gamma(weight: torch.Tensor, n_old: int) -> float:
    """WA's factor (Zhao et al., CVPR 2020): mean norm of the old rows over that of the new rows.

    Multiplying the new rows (``weight[n_old:]``) by it makes both mean norms equal.
    """
    return (mean_row_norm(weight[:n_old]) / mean_row_norm(weight[n_old:])).item()


class RotationHead(nn.Module):
    """SPB-I's auxiliary head on the pre-pooling map: 2 residual BasicBlocks, GAP, cosine classifier (4 outputs: 0/90/180/270 degrees)."""

    def __init__(self, channels: int, sigma: float, learn_scale: bool):
        super().__init__()
        self.blocks = nn.Sequential(BasicBlock(channels, channels, 1, "B"), BasicBlock(channels, channels, 1, "B"))
        self.classifier = CosineLinear(channels, sigma=sigma, learn_scale=learn_scale)
        self.classifier.add_classes(4)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.blocks(maps), 1), 1))


def projection_head(dim: int, out_dim: int) -> nn.Module:
    """The 2-layer MLP projection delta of instance discrimination (SimCLR style)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))
