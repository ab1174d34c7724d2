"""Nearest-mean-of-exemplars classification (iCaRL, Rebuffi et al., CVPR 2017, Alg. 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def class_mean(features: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised mean of the normalised features of one class's exemplars (and their flips)."""
    phi = F.normalize(features.float(), dim=1)
    if flipped is not None:
        phi = torch.cat([phi, F.normalize(flipped.float(), dim=1)])
    return F.normalize(phi.mean(0), dim=0)


def nme_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Scores = minus the squared distance between normalised features and the class means."""
    return -torch.cdist(F.normalize(features.float(), dim=1), means.float()).pow(2)


def class_means(memory, features: Callable[..., torch.Tensor], flip: bool) -> torch.Tensor:
    """One NME mean per class of ``memory`` (an ExemplarMemory), in class order.

    ``features(indices, flip=False)`` gives the exemplars' features; with ``flip`` their mirror
    images enter each mean too (iCaRL's original code).
    """
    idx = memory.indices()
    feats = features(idx)
    flipped = features(idx, flip=True) if flip else None
    means, start = [], 0
    for c in memory.classes:
        k = len(memory.exemplars[c])
        means.append(class_mean(feats[start : start + k], None if flipped is None else flipped[start : start + k]))
        start += k
    return torch.stack(means)
