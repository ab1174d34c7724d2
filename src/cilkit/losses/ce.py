"""Cross-entropy restricted to the new classes, as the exemplar-free methods use it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CeMask = Literal["all", "new"]


def masked_ce(logits: torch.Tensor, y: torch.Tensor, n_old: int, over: CeMask = "all") -> torch.Tensor:
    """Cross-entropy over every seen class (``over="all"``) or over the new classes only (``"new"``).

        all:  CE( z_{1..n_seen}(x), y )
        new:  CE( z_{n_old+1..n_seen}(x), y - n_old )     (the old rows get no gradient)

    Computed in float32.
    """
    if over == "new":
        return F.cross_entropy(logits[:, n_old:].float(), y - n_old)
    return F.cross_entropy(logits.float(), y)
