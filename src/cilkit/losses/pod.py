"""PODNet's losses (Douillard et al., ECCV 2020): the NCA loss of the local similarity classifier and the
pooled-outputs distillation of the stage maps (POD-spatial) and of the embedding (POD-flat).
See docs/methods/podnet.md for the derivations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nca_loss(
    yhat: torch.Tensor,
    y: torch.Tensor,
    eta: torch.Tensor,
    margin: float = 0.6,
    hinge: bool = True,
    margin_grad: bool = False,
    compat: bool = False,
) -> torch.Tensor:
    """NCA loss of the merged similarities ``yhat`` (B, C), averaged over the batch.

    Paper (``compat=False``): the margin on the target entry only, the target out of the denominator,

        L = [ -log( exp(eta (yhat_y - delta)) / sum_{i != y} exp(eta yhat_i) ) ]_+
          = [ logsumexp_{i != y}(eta yhat_i) - eta yhat_y + eta delta ]_+

    Without the target in the denominator this is a log-ratio, not a cross-entropy: it goes negative
    once the target wins by the margin and is unbounded below as eta grows; ``hinge`` clamps each
    sample's loss at 0 (the [.]_+, recalled from the paper's equation). ``margin_grad=False`` lets
    the term eta*delta pass no gradient to eta: with it, dL/deta = delta + E_softmax[yhat_i] - yhat_y
    is positive until the target wins by delta, so a learned eta started at 1 falls through 0 and
    the predictions invert. The loss value is the same either way.

    Official code (``compat=True``): z = eta (yhat - delta) on *every* entry, minus the row max; the
    target slot of the denominator is set to 0 (exp(0) = 1 stays) rather than removed:

        L = log( sum_{i != y} exp(z_i - m) + 1 ) - (z_y - m),   m = max_i z_i
          = log( sum_{i != y} exp(eta yhat_i) + exp(eta max_i yhat_i) ) - eta yhat_y,

    so delta cancels (and L >= 0, so the hinge changes nothing).
    """
    yhat = yhat.float()
    rows = y.view(-1, 1)
    if compat:
        z = eta * (yhat - margin)
        z = z - z.max(1, keepdim=True).values
        losses = torch.logsumexp(z.scatter(1, rows, 0.0), 1) - z.gather(1, rows).squeeze(1)
    else:
        z = eta * yhat
        shift = (eta if margin_grad else eta.detach()) * margin
        losses = torch.logsumexp(z.scatter(1, rows, float("-inf")), 1) - z.gather(1, rows).squeeze(1) + shift
    if hinge:
        losses = losses.clamp_min(0.0)
    return losses.mean()


def pod_embedding(h: torch.Tensor) -> torch.Tensor:
    """Phi(h) of a (B, C, H, W) map: squared activations summed over H (C*W values) and over W
    (C*H values), concatenated and L2-normalised per sample."""
    a = h.float().pow(2)
    return F.normalize(torch.cat([a.sum(2).flatten(1), a.sum(3).flatten(1)], 1), dim=1)


def pod_spatial(old_maps: list[torch.Tensor], new_maps: list[torch.Tensor]) -> torch.Tensor:
    """L_spatial = (1/L) sum_l mean_batch || Phi(old_l) - Phi(new_l) ||_2; 0 without maps (MLP)."""
    if not new_maps:
        return torch.zeros(())
    dists = [(pod_embedding(a) - pod_embedding(b)).norm(dim=1).mean() for a, b in zip(old_maps, new_maps, strict=True)]
    return torch.stack(dists).mean()


def pod_flat(old: torch.Tensor, new: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """POD-flat on the final (pre-ReLU) embedding, averaged over the batch.

    ``l2`` (paper): ||h_old - h_new||_2;  ``cosine`` (official code): 1 - cos(h_old, h_new).
    """
    old, new = old.float(), new.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(new, old, dim=1)).mean()
    return (new - old).norm(dim=1).mean()
