"""The exemplar memory: which training samples of each seen class are kept, in priority order.

Two budgets (docs/spec.md §1.5): a fixed total ``K`` shared equally by the seen classes
(``m = K // n_seen``; old classes shrink to a prefix of their ranked list), or a fixed number per
class. Exemplars are stored as indices into the training split; the images stay in the store.
"""

from __future__ import annotations

from collections.abc import Callable

import math

import torch

from cilkit.memory.herding import herding, random_selection

SELECTIONS = ("herding", "random")


class ExemplarMemory:
    streaming = False  # selected after each task (:meth:`update`), not filled as the stream passes

    def __init__(self, total: int | None = 2000, per_class: int | None = None, selection: str = "herding",
                 nominal_total: int | None = None, replay_ratio: float | None = None):
        """``nominal_total``: the configured total budget even when ``per_class`` rules (PyCIL's BiC
        divides it to size its validation set); ``total`` by default. ``replay_ratio``: see
        :func:`repeat_to`, applied by the methods that mix the exemplars into the task's data."""
        if (total is None) == (per_class is None):
            raise ValueError("give exactly one of total and per_class")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}")
        self.total = total
        self.per_class = per_class
        self.nominal_total = total if nominal_total is None else nominal_total
        self.selection = selection
        self.replay_ratio = replay_ratio
        self.exemplars: dict[int, torch.Tensor] = {}

    def quota(self, n_seen: int) -> int:
        """Exemplars per class once ``n_seen`` classes are in memory."""
        return self.per_class if self.per_class is not None else self.total // n_seen

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.exemplars)

    def indices(self, classes: list[int] | range | None = None) -> torch.Tensor:
        """Training-set indices of the exemplars of ``classes`` (all stored classes by default)."""
        keys = self.classes if classes is None else [c for c in classes if c in self.exemplars]
        if not keys:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.exemplars[c] for c in keys])

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` exemplars drawn uniformly without replacement (all when fewer): (training indices,
        positions in :meth:`indices`)."""
        idx = self.indices()
        pos = torch.randperm(len(idx))[:n]
        return idx[pos], pos

    def update(
        self,
        new_classes: range | list[int],
        class_indices: Callable[[int], torch.Tensor],
        features: Callable[[torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> None:
        """Shrink the old classes to the new quota, then select exemplars of ``new_classes``.

        ``class_indices(c)`` gives the training indices of class ``c``; ``features(idx)`` their
        features under test-time transforms, computed with the model after the task's training.
        """
        m = self.quota(len(self.exemplars) + len(new_classes))
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:m]
        for c in new_classes:
            idx = class_indices(c).cpu()
            if self.selection == "herding":
                order = herding(features(idx), m).cpu()
            else:
                order = random_selection(len(idx), m, generator)
            self.exemplars[int(c)] = idx[order]

    def update_ceil_trim(self, new_classes: range | list[int], class_indices: Callable[[int], torch.Tensor]) -> None:
        """SS-IL's official rule instead of :meth:`update`: see :func:`ceil_trim_first`."""
        ceil_trim_first(self.exemplars, new_classes, class_indices, self.total, self.per_class)

    def state_dict(self) -> dict:
        return {"exemplars": {int(c): v.clone() for c, v in self.exemplars.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.exemplars = {int(c): v.clone() for c, v in state["exemplars"].items()}


def ceil_trim_first(exemplars: dict, new_classes, class_indices, total: int | None, per_class: int | None) -> None:
    """SS-IL's official memory rule (Ahn et al., ICCV 2021, official code), in place on ``exemplars``.

    Quota ceil(K / n_seen) (or the fixed per-class number); new classes take their first samples,
    old ones keep a prefix; then one sample is dropped from each of the ``len - K`` largest classes
    (ties broken towards the latest class, like a stable argsort).
    """
    n_seen = len(exemplars) + len(new_classes)
    quota = per_class if per_class is not None else math.ceil(total / n_seen)
    for c in exemplars:
        exemplars[c] = exemplars[c][:quota]
    for c in new_classes:
        exemplars[int(c)] = class_indices(c).cpu()[:quota]
    if per_class is None:
        excess = sum(len(v) for v in exemplars.values()) - total
        if excess > 0:
            largest = sorted(exemplars, key=lambda c: (len(exemplars[c]), c), reverse=True)[:excess]
            for c in largest:
                exemplars[c] = exemplars[c][:-1]


def repeat_to(indices: torch.Tensor, n: int) -> torch.Tensor:
    """``indices`` repeated to ``n`` items: every one ``n // len`` times, then a random ``n % len`` of
    them once more (rehearsal at a set ratio of old to new samples, ``memory.replay_ratio``)."""
    if len(indices) == 0 or n <= 0:
        return indices[:0]
    whole, rest = divmod(n, len(indices))
    extra = indices[torch.randperm(len(indices), device=indices.device)[:rest]]
    return torch.cat([indices.repeat(whole), extra])
