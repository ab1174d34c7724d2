"""Contrastive losses (SPB-I's instance discrimination)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE (NT-Xent) over two views: for each of the 2B projections, the positive is the other
    view of the same image and the negatives are the other 2B - 2 projections of the batch.

        L = -(1/2B) sum_i log( exp(s(i, i+) / tau) / sum_{j != i} exp(s(i, j) / tau) ),  s = cosine
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positive)
