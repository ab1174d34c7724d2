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
    """Scores = minus the squared distance between normalised features and the class means (-inf for
    a class without a mean, a NaN row)."""
    scores = -torch.cdist(F.normalize(features.float(), dim=1), means.float().nan_to_num(0.0)).pow(2)
    return scores.masked_fill(means.isnan().any(1)[None], float("-inf"))


def class_means(memory, features: Callable[..., torch.Tensor], flip: bool, n_classes: int | None = None) -> torch.Tensor:
    """One NME mean per class of ``memory`` (an exemplar or stream memory), in class order.

    ``features(indices, flip=False)`` gives the exemplars' features; with ``flip`` their mirror
    images enter each mean too (iCaRL's original code). With ``n_classes``, the result has that
    many rows and a class that holds no exemplar (a reservoir may have dropped it) gets a NaN row.
    """
    idx = memory.indices()
    feats = features(idx)
    flipped = features(idx, flip=True) if flip else None
    means, start = {}, 0
    exemplars = memory.exemplars
    for c in memory.classes:
        k = len(exemplars[c])
        means[c] = class_mean(feats[start : start + k], None if flipped is None else flipped[start : start + k])
        start += k
    if n_classes is None:
        return torch.stack(list(means.values()))
    out = torch.full((n_classes, feats.shape[1]), float("nan"), device=feats.device)
    for c, mean in means.items():
        if c < n_classes:
            out[c] = mean
    return out
