"""Dataset readers: each turns one on-disk format into an in-memory :class:`Dataset`.

Class index is the sorted order of class names (or wnids) unless the format defines the labels
(CIFAR, IDX, digits). Every missing or malformed input raises :class:`DatasetError` with one
message naming the exact path and the format that was expected. Folders of image files
(Tiny-ImageNet, image folders) are decoded in parallel once and cached as ``.npz``
(:mod:`cilkit.data.imagecache`; ``cache_dir`` or ``$CILKIT_CACHE`` moves the cache).
"""

from __future__ import annotations

import gzip
import numbers
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cilkit.data.datasets import Dataset, ImageSet, channel_stats
from cilkit.data.download import download_url, extract_archive
from cilkit.data.imagecache import IMAGE_EXTENSIONS, decode_cached, image_files
from cilkit.errors import ConfigError, DatasetError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR_ARCHIVES: dict[str, dict[str, str]] = {
    "cifar10": {"url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "md5": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "md5": "eb9058c3a382ffc7106e4002c42a8d85"},
}


def _stats_dataset(name: str, train: ImageSet, test: ImageSet, class_names: list[str], **kwargs: Any) -> Dataset:
    """A Dataset whose mean/std are the channel statistics of ``train``."""
    mean, std = channel_stats(train.images)
    return Dataset(name, train, test, class_names, mean, std, stats_from_data=True, **kwargs)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to uint8, with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.2, stratify=bunch.target,
                                              random_state=0)
    names = [str(i) for i in range(10)]
    return _stats_dataset("digits", ImageSet(x_tr, y_tr), ImageSet(x_te, y_te), names, natural_images=False)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def _find_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` or ``folder/base.gz``, whichever exists first."""
    return next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes; ``magic`` is 0x803 (images) or 0x801 (labels)."""
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; corrupt deflate data a zlib.error
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise DatasetError(f"corrupt or truncated IDX file {path}: expected a complete gzip-compressed IDX file "
                               f"({type(exc).__name__}: {exc}); download it again") from exc
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    ndim, header, got = magic & 0xFF, 4 + 4 * (magic & 0xFF), int.from_bytes(data[:4], "big")
    if len(data) < 4 or got != magic:
        raise DatasetError(f"bad IDX file {path}: expected magic number 0x{magic:08x} (uint8, {ndim}-d), got 0x{got:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    expected = header + int(np.prod(dims, dtype=np.int64)) if dims else None
    if len(data) != expected:
        told = f"its header gives dims {dims}, so {expected} bytes are expected" if dims else \
            f"expected at least a {header}-byte header (magic number and {ndim} dims)"
        raise DatasetError(f"truncated or oversized IDX file {path}{' (after gunzip)' if compressed else ''}: {told} "
                           f"(a {header}-byte header then one byte per element), found {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(root: str | os.PathLike, name: str) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files (plain or .gz) in ``root/name`` or ``root``."""
    if name not in _IDX_TITLES:
        raise DatasetError(f"unknown IDX dataset {name!r}: expected one of {sorted(_IDX_TITLES)}")
    root = Path(root)
    folder = next((d for d in (root / name, root) if _find_file(d, _IDX_FILES[0])), None)
    if folder is None:
        raise DatasetError(f"{_IDX_TITLES[name]} not found: expected the four IDX files {', '.join(_IDX_FILES)} "
                           f"(plain or .gz) in {root / name} or {root}. Pass --data-root to point at them.")
    paths = [_find_file(folder, base) for base in _IDX_FILES]
    if None in paths:
        missing = folder / _IDX_FILES[paths.index(None)]
        raise DatasetError(f"{_IDX_TITLES[name]} incomplete: expected the IDX file {missing} (plain or .gz)")
    splits = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images, labels = _read_idx(images_path, 0x803), _read_idx(labels_path, 0x801)
        if len(images) != len(labels) or (len(labels) and labels.max() > 9):
            raise DatasetError(f"{labels_path} does not match {images_path}: expected {len(images)} labels in "
                               f"0..9, got {len(labels)} up to {labels.max() if len(labels) else '-'}")
        splits.append(ImageSet(images[..., None].copy(), labels))
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return _stats_dataset(name, splits[0], splits[1], list(names), natural_images=name == "fashion-mnist",
                          meta={"root": str(folder)})


@dataclass(frozen=True)
class _CifarSpec:
    """Where an official CIFAR python folder keeps its parts."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str
    labels_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR = {
    "cifar10": _CifarSpec("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                          "test_batch", "batches.meta", "label_names", "labels",
                          (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _CifarSpec("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_label_names",
                           "fine_labels", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def _text(value: Any) -> str:
    """A pickled CIFAR string, which may arrive as bytes."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Load one CIFAR pickle (latin1) with str keys, checking that ``keys`` are present."""
    if not path.is_file():
        raise DatasetError(f"CIFAR file missing: expected {path} (a pickled dict with keys {', '.join(keys)})")
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="latin1")
        content = {_text(k): v for k, v in raw.items()}
    except Exception as exc:  # unpickling garbage can raise almost anything
        raise DatasetError(f"cannot read {path}: expected a pickled dict (official CIFAR python format): {exc}") from exc
    missing = [k for k in keys if k not in content]
    if missing:
        raise DatasetError(f"malformed CIFAR file {path}: expected keys {', '.join(keys)}, missing {', '.join(missing)}")
    return content


def _cifar_split(folder: Path, files: tuple[str, ...], labels_key: str, n_classes: int) -> ImageSet:
    """Concatenate CIFAR batches: 3072-byte CHW rows -> NHWC uint8."""
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path, ("data", labels_key))
        expected = f"expected 'data' uint8 (N, 3072) and N '{labels_key}' in 0..{n_classes - 1}"
        try:
            data, y = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[labels_key], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"malformed CIFAR file {path}: {expected}: {exc}") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or y.shape != (len(data),) or \
                (len(y) and not 0 <= y.min() <= y.max() < n_classes):
            raise DatasetError(f"malformed CIFAR file {path}: {expected}, got {data.shape} and {y.shape} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def _download_cifar(root: Path, name: str) -> None:
    """Fetch and unpack the official CIFAR archive into ``root``; the archive is removed afterwards."""
    archive_info = CIFAR_ARCHIVES[name]
    archive = root / archive_info["url"].rstrip("/").rsplit("/", 1)[-1]
    download_url(archive_info["url"], archive, md5=archive_info["md5"])
    try:
        extract_archive(archive, root)
    finally:
        archive.unlink(missing_ok=True)


def load_cifar(root: str | os.PathLike, name: str, download: bool = False) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the official python folder under ``root`` (downloaded if asked)."""
    if name not in _CIFAR:
        raise DatasetError(f"unknown CIFAR dataset {name!r}: expected one of {sorted(_CIFAR)}")
    spec, root = _CIFAR[name], Path(root)
    folder = root / spec.folder
    if not folder.is_dir() and download:
        _download_cifar(root, name)
    if not folder.is_dir():
        files = ", ".join((*spec.train, spec.test, spec.meta))
        hint = "the downloaded archive did not contain it." if download else \
            "Pass --download to fetch it, or --data-root to point at it."
        raise DatasetError(f"{spec.title} not found: expected the official python folder {folder} with files "
                           f"{files} (pickled dicts). {hint}")
    names = [_text(n) for n in _unpickle(folder / spec.meta, (spec.names_key,))[spec.names_key]]
    train = _cifar_split(folder, spec.train, spec.labels_key, len(names))
    test = _cifar_split(folder, (spec.test,), spec.labels_key, len(names))
    return Dataset(name, train, test, names, spec.mean, spec.std, meta={"root": str(folder)})


_TINY_LAYOUT = ("wnids.txt, optional words.txt, train/<wnid>/images/*.JPEG, val/images/* and "
                "val/val_annotations.txt (file<TAB>wnid<TAB>box)")


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, or DatasetError naming it."""
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: expected a text file of the Tiny-ImageNet layout: {exc}") from exc


def _tiny_names(tree: Path, wnids: list[str]) -> list[str]:
    """Class names from words.txt (first synonym), falling back to the wnid."""
    words = tree / "words.txt"
    lookup = {}
    if words.is_file():
        lookup = dict(line.split("\t", 1) for line in _read_lines(words) if "\t" in line)
    return [lookup.get(w, w).split(",")[0].strip() or w for w in wnids]


def _unpacked(archive: Path) -> Path:
    """The folder an archive of the tree is unpacked into, once: ``~/.cache/cilkit-data/<stem>``."""
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        stem = stem.removesuffix(suffix)
    dest = Path.home() / ".cache" / "cilkit-data" / stem
    if not (dest / "wnids.txt").is_file() and not (dest / stem / "wnids.txt").is_file():
        extract_archive(archive, dest)
    return dest


def load_tinyimagenet(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Tiny-ImageNet-200 (any resolution) from its official folder layout; val is the test split.

    ``root`` may also be an archive of that tree (``tiny-imagenet-32.tar.gz``): it is unpacked once
    into ``~/.cache/cilkit-data/``. ``cache_dir``: the folder of the decoded-image cache, as for
    :func:`load_imagefolder`.
    """
    root = Path(root)
    if root.is_file():
        root = _unpacked(root)
    candidates = (root, root / "tiny-imagenet-200", root / "tiny-imagenet-32", root / root.name)
    tree = next((c for c in candidates if (c / "wnids.txt").is_file()), None)
    if tree is None:
        raise DatasetError(f"Tiny-ImageNet not found: expected {_TINY_LAYOUT} in {root}, "
                           f"{candidates[1]} or {candidates[2]}. Pass --data-root to point at it.")
    wnids = sorted({w.strip() for w in _read_lines(tree / "wnids.txt")})
    index = {w: i for i, w in enumerate(wnids)}
    train, y_train = [], []
    for wnid in wnids:
        folder = tree / "train" / wnid / "images"
        files = image_files(folder) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"Tiny-ImageNet train images missing: expected image files in {folder} "
                               f"(class {wnid} of {tree / 'wnids.txt'})")
        train += files
        y_train += [index[wnid]] * len(files)
    annotations = tree / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"Tiny-ImageNet val labels missing: expected {annotations} (file<TAB>wnid<TAB>box)")
    test, y_test = [], []
    for number, line in enumerate(_read_lines(annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(f"malformed {annotations} line {number}: expected file<TAB>wnid with a wnid "
                               f"listed in wnids.txt, got {line!r}")
        test.append(os.path.join(tree, "val", "images", fields[0]))
        y_test.append(index[fields[1]])
    x_train, x_test = decode_cached(tree, "tinyimagenet.npz", train, test, None, cache_dir=cache_dir)
    return _stats_dataset("tinyimagenet", ImageSet(x_train, y_train), ImageSet(x_test, y_test),
                          _tiny_names(tree, wnids), meta={"root": str(tree), "wnids": wnids})


def _listed(items: list[str], limit: int = 20) -> str:
    """``a, b, c`` with at most ``limit`` items, then ``and N more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_imagefolder(root: str | os.PathLike, image_size: int | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Dataset:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``).

    ``image_size``: every image is resized (shorter side) and centre-cropped to that square size; None:
    the images are kept at their own size, which they must all share (read from their headers).
    ``cache_dir``: the folder of the decoded-image cache (default: ``$CILKIT_CACHE``, else
    ``root/.cilkit-cache`` when writable, else ``~/.cache/cilkit``).
    """
    root = Path(root)
    layout = f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (or {root}/val/<class>/<image>)"
    test_dir = next((d for d in (root / "test", root / "val") if d.is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DatasetError(f"image folder not found: expected {layout}, images by extension "
                           f"({', '.join(sorted(IMAGE_EXTENSIONS))}). Pass --data-root to point at it.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
                                   or image_size < 1):
        raise ConfigError("data.image_size", f"must be a positive integer (pixels) or null for the images' own size, "
                                             f"got {image_size!r}")
    train_dir = root / "train"
    names, test_names = _class_dirs(train_dir), _class_dirs(test_dir)
    if not names:
        raise DatasetError(f"image folder {root} has no class folders in {train_dir}: expected {layout}")
    problems = []
    only_test, only_train = sorted(set(test_names) - set(names)), sorted(set(names) - set(test_names))
    if only_test:
        problems.append(f"{test_dir} has class folders that {train_dir} lacks: {_listed(only_test)}")
    if only_train:
        problems.append(f"{train_dir} has class folders that {test_dir} lacks (they would have no test data): "
                        f"{_listed(only_train)}")
    splits: list[tuple[list[str], list[int]]] = []
    empty: list[str] = []
    for split_dir in (train_dir, test_dir):
        files, labels = [], []
        for label, name in enumerate(names):
            if not (split_dir / name).is_dir():
                continue
            found = image_files(split_dir / name)
            if not found:
                empty.append(str(split_dir / name))
            files += found
            labels += [label] * len(found)
        splits.append((files, labels))
    if empty:
        problems.append(f"class folders without images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {_listed(empty)}")
    if problems:
        raise DatasetError(f"malformed image folder {root}: expected the same class folders in {train_dir} and "
                           f"{test_dir}, each with at least one image; " + "; ".join(problems))
    (train, y_train), (test, y_test) = splits
    x_train, x_test = decode_cached(root, f"imagefolder-{image_size or 'native'}.npz", train, test, image_size,
                                    size_field="data.image_size", cache_dir=cache_dir)
    return _stats_dataset("imagefolder", ImageSet(x_train, y_train), ImageSet(x_test, y_test), names,
                          meta={"root": str(root)})


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """uint8 NHWC from uint8/integer images in 0..255 or float images in [0, 1], NHW or NHWC."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetError(f"malformed {path}: '{key}' must be images (N, H, W) or (N, H, W, 1|3), got {x.shape}")
    if x.dtype == np.uint8:
        return x
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(x.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and 0 <= lo and hi <= 255:
        return x.astype(np.uint8)
    raise DatasetError(f"malformed {path}: '{key}' must be uint8 0..255 or float in [0, 1], got {x.dtype} "
                       f"in [{lo}, {hi}]")


def load_numpy(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` and optional ``class_names``."""
    path = Path(path)
    expected = ("an .npz file with arrays x_train, y_train, x_test, y_test (uint8 NHWC or NHW images, or float "
                "in [0, 1]; int labels 0..K-1) and optional class_names")
    if not path.is_file():
        raise DatasetError(f"numpy dataset not found: expected {expected} at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {path}: expected {expected}: {exc}") from exc
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DatasetError(f"malformed {path}: missing {', '.join(missing)}; expected {expected}")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    integer = all(np.issubdtype(y.dtype, np.integer) and y.ndim == 1 for y in (y_train, y_test))
    n_classes = (len(names) if names else int(y_train.max()) + 1) if integer and y_train.size else 0
    used = set(np.unique(np.concatenate([y_train, y_test])).tolist()) if integer else set()
    if not n_classes or not used <= set(range(n_classes)) or (names is None and len(np.unique(y_train)) < n_classes):
        raise DatasetError(f"malformed {path}: y_train and y_test must be 1-d integer labels in 0..K-1 with K = "
                           f"len(class_names), else every label 0..K-1 present in y_train; got {y_train.dtype} "
                           f"{y_train.shape} and {y_test.dtype} {y_test.shape}, values {sorted(used)[:10]}")
    try:
        train = ImageSet(_npz_images(arrays["x_train"], "x_train", path), y_train)
        test = ImageSet(_npz_images(arrays["x_test"], "x_test", path), y_test)
    except ValueError as exc:
        raise DatasetError(f"malformed {path}: {exc}") from exc
    return _stats_dataset(path.stem, train, test, names or [str(i) for i in range(n_classes)],
                          meta={"path": str(path)})
