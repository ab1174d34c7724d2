"""In-memory image datasets: one form for every source.

Every loader returns a :class:`Dataset` whose splits hold uint8 images in NHWC layout and int64
labels in ``[0, n_classes)``, plus the class names and the per-channel normalisation statistics.
The class order of a scenario is applied later (:mod:`cilkit.data.scenario`), never here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """One split: ``images`` uint8 (N, H, W, C) with C in {1, 3}; ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A dataset held in memory: train and test splits, class names and normalisation statistics.

    ``mean`` and ``std`` are per channel on the [0, 1] scale. ``natural_images`` tells the
    augmentation whether horizontal flips make sense (not for digits).
    """

    name: str
    train: ImageSet
    test: ImageSet
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    natural_images: bool = True
    meta: dict = field(default_factory=dict)
    # mean/std are the channel statistics of the training images (recomputed when they change: pad_images),
    # not published constants
    stats_from_data: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, h, w, c = self.train.images.shape
        return (c, h, w)


def pad_images(dataset: Dataset, pad: int) -> Dataset:
    """``dataset`` with every image (train and test) zero-padded by ``pad`` pixels on each side.

    Statistics computed from the training images are recomputed over the padded ones, so that the zero
    borders count as the network will see them; published constants are kept.
    """
    if pad == 0:
        return dataset
    width = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    train = ImageSet(np.pad(dataset.train.images, width), dataset.train.labels)
    test = ImageSet(np.pad(dataset.test.images, width), dataset.test.labels)
    mean, std = channel_stats(train.images) if dataset.stats_from_data else (dataset.mean, dataset.std)
    return dataclasses.replace(dataset, train=train, test=test, mean=mean, std=std)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, from a histogram of the uint8 values per channel."""
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for ch in range(c):
        hist = np.bincount(flat[:, ch], minlength=256).astype(np.float64)
        p = hist / hist.sum()
        m = float((p * values).sum())
        sd = float(np.sqrt(max((p * (values - m) ** 2).sum(), 0.0)))
        mean.append(m)
        std.append(sd if sd > 1e-6 else 1.0)
    return tuple(mean), tuple(std)
