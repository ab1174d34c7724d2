"""A user's own data as tasks: new classes from a folder of images, tasks given as arrays or a
``torch.utils.data.Dataset``, and appending a task's classes after a scenario's.

What comes in here is brought to the form of every other dataset (uint8 NHWC, labels 0..K-1, class
names); the new classes take the next labels after the scenario's and their images are appended after
the old ones, so the indices an exemplar memory holds into the old training set stay valid.

- :func:`read_class_folder`: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``), or a
  plain ``root/<class>/*`` tree whose images are split per class with a fixed seed; every image is
  decoded to the run's channels and resized (shorter side, bilinear) and centre-cropped to the run's
  height x width. Colour images are refused by a greyscale model (their grey version is the user's
  choice to make), greyscale ones are repeated over three channels for a colour model.
- :func:`task_split`: one task given in Python (arrays with optional class names, a Dataset, or a
  ``{"train": ..., "test": ...}`` pair of them), checked; without a test part it is split as a plain tree.
- :func:`append_task`, :func:`stream_scenario`: a scenario that grows by one task; a scenario that
  follows the given tasks (not a class order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.data.datasets import Dataset, ImageSet, channel_stats
from cilkit.data.imagecache import IMAGE_EXTENSIONS, corrupt_files_error, fit_image, image_files
from cilkit.data.scenario import Scenario
from cilkit.errors import DatasetError

SPLIT_LAYOUT = "root/train/<class>/<image> and root/test/<class>/<image> (or val/), or root/<class>/<image>"


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_indices(labels: np.ndarray, test_fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions of a per-class split: ``round(test_fraction * n)`` of each class's ``n``
    samples (at least one, and at least one left for training) drawn with ``RandomState(seed)``."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DatasetError(f"{where}: class {c!r} has {len(idx)} sample; a class without a test part needs at least 2 "
                               f"to be split into train and test (or give its test samples)")
        k = min(max(1, round(test_fraction * len(idx))), len(idx) - 1)
        perm = rng.permutation(idx)
        test.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return np.concatenate(train), np.concatenate(test)


def decode_to(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (N, H, W, C) of ``paths`` at the (C, H, W) ``shape``; every undecodable file, and every colour
    image for a greyscale ``shape``, is named in one DatasetError."""
    from PIL import Image

    c, h, w = shape
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)
    broken: list[tuple[str, str]] = []
    colour: list[str] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = fit_image(image.convert("RGB"), h, w)
        except Exception as exc:  # noqa: BLE001 - a broken file can make PIL raise almost anything
            broken.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        array = np.asarray(rgb, dtype=np.uint8)
        if c == 1:
            if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
                colour.append(path)
                continue
            array = array[..., :1]
        out[i] = array
    if broken:
        raise corrupt_files_error(broken, len(paths))
    if colour:
        shown = ", ".join(colour[:5]) + (f" and {len(colour) - 5} more" if len(colour) > 5 else "")
        raise DatasetError(f"the run's model takes greyscale images (1 channel), but {len(colour)} of {len(paths)} images are "
                           f"in colour: {shown}; convert them to greyscale first if that is what the model should see")
    return out


def read_class_folder(root: str | os.PathLike, shape: tuple[int, int, int], *, test_fraction: float = 0.2,
                      seed: int = 0) -> Dataset:
    """The classes of a folder of images, at the (C, H, W) ``shape`` of a run's images (module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist: expected {SPLIT_LAYOUT}")
    test_dir = next((d for d in (root / "test", root / "val") if d.is_dir()), None)
    split = (root / "train").is_dir() and test_dir is not None
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    if split:
        names = _class_dirs(root / "train")
        if set(names) != set(_class_dirs(test_dir)):
            raise DatasetError(f"malformed image folder {root}: {root / 'train'} and {test_dir} must hold the same class "
                               f"folders, got {names} and {_class_dirs(test_dir)}")
        folders = [(root / "train", test_dir)]
    else:
        names = _class_dirs(root)
        folders = [(root, None)]
    if not names:
        raise DatasetError(f"image folder {root} holds no class folders: expected {SPLIT_LAYOUT}, images by extension ({exts})")
    files: dict[str, list[list[str]]] = {}
    empty = []
    for name in names:
        lists = [image_files(d / name) if d is not None else [] for d in folders[0]]
        files[name] = lists
        if not lists[0] or (split and not lists[1]):
            empty.append(str(folders[0][0] / name) if not lists[0] else str(test_dir / name))
    if empty:
        raise DatasetError(f"image folder {root}: class folders without images ({exts}): {', '.join(empty[:20])}")
    train_paths = [p for n in names for p in files[n][0]]
    train_labels = np.array([i for i, n in enumerate(names) for _ in files[n][0]], dtype=np.int64)
    if split:
        test_paths = [p for n in names for p in files[n][1]]
        test_labels = np.array([i for i, n in enumerate(names) for _ in files[n][1]], dtype=np.int64)
        images = decode_to(train_paths + test_paths, shape)
        train = ImageSet(images[: len(train_paths)], train_labels)
        test = ImageSet(images[len(train_paths):], test_labels)
    else:
        images = decode_to(train_paths, shape)
        tr, te = split_indices(train_labels, test_fraction, seed, f"image folder {root}")
        train, test = ImageSet(images[tr], train_labels[tr]), ImageSet(images[te], train_labels[te])
    mean, std = channel_stats(train.images)
    return Dataset(root.name, train, test, names, mean, std, meta={"root": str(root)}, stats_from_data=True)


# -- tasks given in Python ------------------------------------------------------------------------


def _as_uint8(x: Any, where: str) -> np.ndarray:
    """uint8 NHWC from NHW, NHWC or NCHW (C in 1, 3) arrays or tensors, uint8 0..255 or float in [0, 1]."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW (torch's layout)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(x.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and 0 <= lo and hi <= 255:
        return x.astype(np.uint8)
    raise DatasetError(f"{where}: images must be uint8 0..255 or float in [0, 1], got {x.dtype} in [{lo}, {hi}]")


def _from_dataset(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(image, label)`` item of a map-style Dataset (images: tensors CHW/HW, arrays HWC/HW or PIL images)."""
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(f"{where}: item {i} of the Dataset must be (image, label), got {type(item).__name__}")
        image, label = item[0], item[1]
        if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
            image = np.asarray(image)
        elif hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
                image = image.transpose(1, 2, 0)
        xs.append(np.asarray(image))
        ys.append(label.item() if hasattr(label, "item") else label)
    if not xs:
        raise DatasetError(f"{where}: the Dataset is empty")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DatasetError(f"{where}: the Dataset's images differ in shape: {sorted(shapes)[:5]}")
    return np.stack(xs), np.asarray(ys)


def _part(part: Any, where: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(images, raw labels, class names or None) of arrays ``{"x", "y", "class_names"}`` / ``(x, y)`` or a Dataset."""
    if isinstance(part, dict):
        unknown = set(part) - {"x", "y", "class_names"}
        if unknown or not {"x", "y"} <= set(part):
            raise DatasetError(f"{where}: expected the keys x, y and optionally class_names, got {sorted(part)}")
        x, y, names = part["x"], part["y"], part.get("class_names")
    elif isinstance(part, tuple) and len(part) in (2, 3):
        x, y, names = part[0], part[1], part[2] if len(part) == 3 else None
    elif _is_dataset(part):
        x, y = _from_dataset(part, where)
        names = getattr(part, "class_names", None) or getattr(part, "classes", None)
    else:
        raise DatasetError(f"{where}: a task is arrays {{'x': images, 'y': labels, 'class_names': [...]}} (or (x, y)), a "
                           f"torch.utils.data.Dataset of (image, label), or {{'train': ..., 'test': ...}} of those; "
                           f"got {type(part).__name__}")
    images = _as_uint8(x, where)
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(images):
        raise DatasetError(f"{where}: y must be one label per image, got {y.shape} for {len(images)} images")
    if len(images) == 0:
        raise DatasetError(f"{where}: no images")
    return images, y, None if names is None else [str(n) for n in names]


def _is_dataset(obj: Any) -> bool:
    import torch.utils.data

    return isinstance(obj, torch.utils.data.Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                                          and not isinstance(obj, (np.ndarray, tuple, list, dict, str)))


def _labels(y: np.ndarray, names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Labels 0..K-1 in the sorted order of the task's label values, and the classes' names.

    ``names``: one per class of the task (then integer labels 0..K-1 index it), else the labels' values."""
    values = np.unique(y)
    if names is not None:
        if not np.issubdtype(y.dtype, np.integer) or values.min() < 0 or values.max() >= len(names):
            raise DatasetError(f"{where}: with class_names, y must be integers 0..{len(names) - 1} indexing them")
        if len(set(names)) != len(names):
            raise DatasetError(f"{where}: class_names repeat a name: {names}")
        used = [int(v) for v in values]
        lookup = np.full(len(names), -1, dtype=np.int64)
        lookup[used] = np.arange(len(used))
        return lookup[y.astype(np.int64)], [names[v] for v in used]
    return np.searchsorted(values, y).astype(np.int64), [str(v.item() if hasattr(v, "item") else v) for v in values]


def task_split(task: Any, where: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """One task given in Python as a Dataset of its classes (labels 0..K-1, train and test parts)."""
    if isinstance(task, dict) and set(task) <= {"train", "test"} and "train" in task:
        x, y, names = _part(task["train"], f"{where} (train)")
        y, names = _labels(y, names, f"{where} (train)")
        train = ImageSet(x, y)
        if "test" in task:
            tx, ty, tnames = _part(task["test"], f"{where} (test)")
            lookup = {n: i for i, n in enumerate(names)}
            ty, tnames = _labels(ty, tnames or None, f"{where} (test)")
            missing = [n for n in tnames if n not in lookup]
            if missing:
                raise DatasetError(f"{where}: the test part has classes the train part lacks: {missing}")
            test = ImageSet(tx, np.array([lookup[tnames[v]] for v in ty], dtype=np.int64))
        else:
            tr, te = split_indices(y, test_fraction, seed, where)
            train, test = ImageSet(x[tr], y[tr]), ImageSet(x[te], y[te])
    else:
        x, y, names = _part(task, where)
        y, names = _labels(y, names, where)
        tr, te = split_indices(y, test_fraction, seed, where)
        train, test = ImageSet(x[tr], y[tr]), ImageSet(x[te], y[te])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DatasetError(f"{where}: train images are {train.images.shape[1:]} but test images {test.images.shape[1:]}")
    mean, std = channel_stats(train.images)
    return Dataset(where, train, test, names, mean, std, stats_from_data=True)


# -- scenarios that grow --------------------------------------------------------------------------


def append_task(scenario: Scenario, part: Dataset, where: str = "the new data") -> Scenario:
    """``scenario`` with one more task: the classes of ``part`` with the next labels, their images after the old
    ones (the old indices keep their meaning). ``part`` must have the scenario's image shape and new class names."""
    ds = scenario.dataset
    if part.image_shape != ds.image_shape:
        c, h, w = part.image_shape
        rc, rh, rw = ds.image_shape
        raise DatasetError(f"{where}: images of {h}x{w} with {c} channel(s), but the model takes {rh}x{rw} with {rc} "
                           f"channel(s): bring them to that shape first")
    old = {str(n).casefold(): str(n) for n in ds.class_names}
    clash = [n for n in part.class_names if str(n).casefold() in old]
    if clash:
        raise DatasetError(f"{where}: the classes {', '.join(map(repr, clash))} already exist in the run (its classes: "
                           f"{', '.join(map(str, ds.class_names))}); new classes need new names")
    n = scenario.n_classes
    train, test = (ImageSet(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels + n]))
                   for a, b in ((ds.train, part.train), (ds.test, part.test)))
    grown = dataclasses.replace(ds, train=train, test=test, class_names=list(ds.class_names) + list(part.class_names))
    first = max(scenario.order, default=-1) + 1
    order = list(scenario.order) + list(range(first, first + part.n_classes))
    return Scenario(grown, order, list(scenario.increments) + [part.n_classes], f"{scenario.name}+{part.n_classes}")


def stream_scenario(tasks: Sequence[Any], *, test_fraction: float = 0.2, seed: int = 0) -> Scenario:
    """The scenario of a user's stream: task ``t`` holds the classes of ``tasks[t]``, in the order given.

    Every task is checked (:func:`task_split`); the channel statistics are those of every task's training images."""
    if isinstance(tasks, (dict, str)) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise DatasetError("a stream is a non-empty list of tasks (arrays {'x', 'y', 'class_names'}, a Dataset, or "
                           "{'train': ..., 'test': ...} of those)")
    parts = [task_split(t, f"stream task {i + 1}", test_fraction=test_fraction, seed=seed) for i, t in enumerate(tasks)]
    first = parts[0]
    first = dataclasses.replace(first, name="stream")
    scenario = Scenario(first, list(range(first.n_classes)), [first.n_classes], "stream")
    for i, part in enumerate(parts[1:], 2):
        scenario = append_task(scenario, part, f"stream task {i}")
    ds = scenario.dataset
    mean, std = channel_stats(ds.train.images)
    scenario.dataset = dataclasses.replace(ds, mean=mean, std=std, meta={"source": "stream"})
    scenario.name = "T" + "-".join(str(s) for s in scenario.increments)
    return scenario


def read_new_classes(root: str | os.PathLike, shape: tuple[int, int, int], *, test_fraction: float = 0.2,
                     seed: int = 0) -> Dataset:
    """The classes of one entry of ``data.new_classes``: a folder of images (:func:`read_class_folder`, brought to
    the (C, H, W) ``shape``) or an ``.npz`` of the numpy dataset's form (its images must have that shape)."""
    path = Path(root).expanduser()
    if path.is_file():
        from cilkit.data.readers import load_numpy

        return load_numpy(path)
    return read_class_folder(path, shape, test_fraction=test_fraction, seed=seed)
