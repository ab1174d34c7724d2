"""Class-incremental scenarios: a class order and a split of the classes into tasks.

``B{base}-Inc{n}``: a first task of ``base`` classes (``B0`` means the first task also has ``n``),
then tasks of ``n`` classes; a shorter last task takes the remainder, as PyCIL's DataManager does.
The class order is that of ``numpy.random.seed(1993); numpy.random.permutation(n_classes)`` by
default (iCaRL, UCIR, PyCIL), drawn from a local ``RandomState`` so numpy's global RNG is untouched.
Labels are remapped once, so that task ``t`` holds consecutive ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cilkit.data.datasets import Dataset, ImageSet
from cilkit.errors import ConfigError

_SCENARIO_RE = re.compile(r"^B(\d+)-?Inc(\d+)$", re.IGNORECASE)


def class_order(n_classes: int, order: str | list[int] = "seed", seed: int = 1993) -> list[int]:
    """The order in which the original classes arrive.

    ``"seed"``: ``np.random.RandomState(seed).permutation(n_classes)``, the same order as
    ``np.random.seed(seed); np.random.permutation(n_classes)`` (the field's standard with seed 1993);
    ``"identity"``: ``0..n-1``; a list: that permutation, checked.
    """
    if isinstance(order, str):
        if order == "seed":
            # a local generator: the same order as np.random.seed(seed); np.random.permutation(n),
            # without touching numpy's global RNG
            return [int(c) for c in np.random.RandomState(seed).permutation(n_classes)]
        if order == "identity":
            return list(range(n_classes))
        raise ConfigError("scenario.class_order", f"'{order}' is not allowed: use 'seed', 'identity' or a list of class ids")
    got = [int(c) for c in order]
    if sorted(got) != list(range(n_classes)):
        raise ConfigError(
            "scenario.class_order",
            f"an explicit order must be a permutation of 0..{n_classes - 1} ({n_classes} distinct ids), got {len(got)} ids",
        )
    return got


def parse_increments(spec: str | list[int], n_classes: int) -> list[int]:
    """Task sizes from ``B{base}-Inc{n}`` or an explicit list; they must add up to ``n_classes``."""
    if isinstance(spec, str):
        m = _SCENARIO_RE.match(spec.strip())
        if not m:
            raise ConfigError("scenario.name", f"'{spec}' is not a scenario: use B{{base}}-Inc{{n}} (e.g. B0-Inc10, B50-Inc5) or a list of task sizes")
        base, inc = int(m.group(1)), int(m.group(2))
        if inc <= 0:
            raise ConfigError("scenario.name", f"the increment in '{spec}' must be positive")
        if base >= n_classes:
            raise ConfigError("scenario.name", f"'{spec}' needs a base of fewer than {n_classes} classes (the dataset has {n_classes})")
        sizes = [base] if base > 0 else []
        rest = n_classes - base
        sizes += [inc] * (rest // inc)
        if rest % inc:
            sizes.append(rest % inc)
        return sizes
    sizes = [int(s) for s in spec]
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError("scenario.name", f"task sizes must be positive integers, got {sizes}")
    if sum(sizes) != n_classes:
        raise ConfigError("scenario.name", f"task sizes {sizes} add up to {sum(sizes)} but the scenario has {n_classes} classes")
    return sizes


@dataclass(frozen=True)
class Task:
    """Task ``index`` adds the classes ``[start, stop)`` (ids after remapping)."""

    index: int
    start: int
    stop: int

    @property
    def n_classes(self) -> int:
        return self.stop - self.start

    @property
    def classes(self) -> range:
        return range(self.start, self.stop)

    @property
    def old_fraction(self) -> float:
        """n_old / n_seen: the share of old classes among those seen (the KD weight of WA, BiC, COIL)."""
        return self.start / self.stop


@dataclass
class Scenario:
    """A dataset with its labels remapped to arrival order, and the tasks that split it."""

    dataset: Dataset
    order: list[int]
    increments: list[int]
    name: str

    @property
    def tasks(self) -> list[Task]:
        bounds = np.cumsum([0] + self.increments)
        return [Task(i, int(bounds[i]), int(bounds[i + 1])) for i in range(len(self.increments))]

    @property
    def n_classes(self) -> int:
        return sum(self.increments)

    @property
    def boundaries(self) -> list[int]:
        """The first class id of every task, then the total: ``[0, n1, n1+n2, ..., C]``."""
        return [int(b) for b in np.cumsum([0] + self.increments)]


def _remap(split: ImageSet, lookup: np.ndarray) -> ImageSet:
    new = lookup[split.labels]
    keep = new >= 0
    return ImageSet(split.images[keep], new[keep])


def make_scenario(
    dataset: Dataset,
    scenario: str | list[int],
    order: str | list[int] = "seed",
    order_seed: int = 1993,
    n_classes: int | None = None,
) -> Scenario:
    """Build a scenario; ``n_classes`` keeps only the first K classes of the order (protocols)."""
    full = class_order(dataset.n_classes, order, order_seed)
    k = dataset.n_classes if n_classes is None else int(n_classes)
    if not 1 < k <= dataset.n_classes:
        raise ConfigError("data.n_classes", f"must be between 2 and {dataset.n_classes} for '{dataset.name}', got {k}")
    kept = full[:k]
    increments = parse_increments(scenario, k)
    lookup = np.full(dataset.n_classes, -1, dtype=np.int64)
    lookup[kept] = np.arange(k)
    remapped = Dataset(
        name=dataset.name,
        train=_remap(dataset.train, lookup),
        test=_remap(dataset.test, lookup),
        class_names=[dataset.class_names[c] for c in kept],
        mean=dataset.mean,
        std=dataset.std,
        natural_images=dataset.natural_images,
        meta=dict(dataset.meta),
        stats_from_data=dataset.stats_from_data,
    )
    name = scenario if isinstance(scenario, str) else "T" + "-".join(str(s) for s in increments)
    return Scenario(remapped, kept, increments, name)
