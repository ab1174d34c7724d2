"""Cross-entropy restricted to the new classes, as the exemplar-free methods use it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CeMask = Literal["all", "new"]


def masked_ce(logits: torch.Tensor, y: torch.Tensor, n_old: int, over: CeMask = "all", n_seen: int | None = None) -> torch.Tensor:
    """Cross-entropy over every logit (``over="all"``) or over the new classes only (``"new"``).

        all:  CE( z(x), y )                                (every seen class; with a fixed head every class)
        new:  CE( z_{n_old+1..n_seen}(x), y - n_old )     (the old rows get no gradient)

    ``n_seen``: the classes seen so far, where the logits go beyond them (a fixed head: the unseen
    classes are not the task's new ones); None: every column after the old ones. Computed in float32.
    """
    if over == "new":
        return F.cross_entropy(logits[:, n_old:n_seen].float(), y - n_old)
    return F.cross_entropy(logits.float(), y)
