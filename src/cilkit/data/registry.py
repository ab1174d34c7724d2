"""The datasets cilkit can load by name, and how each one is found on disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cilkit.data.datasets import Dataset


@dataclass(frozen=True)
class DatasetSpec:
    loader: Callable[..., Dataset]
    needs_root: bool
    layout: str  # what is expected under --data-root, for error messages


def _digits(root, **_):
    from cilkit.data.readers import load_digits

    return load_digits()


def _idx(name: str):
    def load(root, **_):
        from cilkit.data.readers import load_idx

        return load_idx(Path(root).expanduser(), name)

    return load


def _cifar(name: str):
    def load(root, download=False, **_):
        from cilkit.data.readers import load_cifar

        return load_cifar(Path(root).expanduser(), name, download=download)

    return load


def _tinyimagenet(root, cache_dir=None, **_):
    from cilkit.data.readers import load_tinyimagenet

    return load_tinyimagenet(Path(root).expanduser(), cache_dir=cache_dir)


def _imagefolder(root, image_size=None, cache_dir=None, **_):
    from cilkit.data.readers import load_imagefolder

    # image_size None: the images' own size; cache_dir None: $CILKIT_CACHE or next to the data
    return load_imagefolder(Path(root).expanduser(), image_size, cache_dir=cache_dir)


def _numpy(root, **_):
    from cilkit.data.readers import load_numpy

    return load_numpy(Path(root).expanduser())


def _stream(root, **_):
    from cilkit.errors import DatasetError

    raise DatasetError("this run's data were given in Python as a stream of tasks (cilkit.run(..., stream=[...])); they are "
                       "not on disk: pass the same stream again (cilkit.Experiment.resume(run_dir, stream=[...]))")


_IDX = "the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz)"
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, False, "nothing: scikit-learn's bundled 8x8 digits"),
    "mnist": DatasetSpec(_idx("mnist"), True, f"{_IDX} in <root>/mnist or <root>"),
    "fashion-mnist": DatasetSpec(_idx("fashion-mnist"), True, f"{_IDX} in <root>/fashion-mnist or <root>"),
    "cifar10": DatasetSpec(_cifar("cifar10"), True, "<root>/cifar-10-batches-py (the official python version; --download fetches it)"),
    "cifar100": DatasetSpec(_cifar("cifar100"), True, "<root>/cifar-100-python (the official python version; --download fetches it)"),
    "tinyimagenet": DatasetSpec(
        _tinyimagenet, True,
        "the official Tiny-ImageNet-200 tree (wnids.txt, train/<wnid>/images, val/images, val/val_annotations.txt) at <root>, "
        "<root>/tiny-imagenet-200 or <root>/tiny-imagenet-32",
    ),
    "imagefolder": DatasetSpec(_imagefolder, True, "<root>/train/<class>/* and <root>/test/<class>/* (or val/)"),
    "numpy": DatasetSpec(_numpy, True, "an .npz file with x_train, y_train, x_test, y_test"),
    # tasks given in Python (cilkit.run(config, stream=[...])): the scenario follows them, nothing is read from disk
    "stream": DatasetSpec(_stream, False, "tasks given in Python: cilkit.run(config, stream=[...])"),
}


def load_dataset(name: str, root: str | None = None, **options) -> Dataset:
    return DATASETS[name].loader(root, **options)
