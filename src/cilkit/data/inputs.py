"""The images a user hands a trained model: image files, folders of them, ``.npz`` files and arrays, brought
to the run's stored form (``Preprocess``: channels, size, padding and normalisation recorded in its config) and
decoded in batches, the next batch in a thread while the model runs the current one.

Every problem with an input (a missing or undecodable file, a colour image for a greyscale model, an array of
the wrong type or shape) is one :class:`InputError` naming the inputs at fault.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cilkit.data.imagecache import IMAGE_EXTENSIONS, fit_image
from cilkit.errors import CilkitError

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MAX_LISTED = 20


class InputError(CilkitError):
    """An image to predict on is missing, unreadable, or not of the shape the model takes."""


@dataclass(frozen=True)
class Preprocess:
    """How the run's images were prepared: ``channels``, the stored ``height`` x ``width`` (before ``pad``),
    ``resize`` (the square size of ``data.image_size``, or None: images must already be height x width)."""

    channels: int
    height: int
    width: int
    pad: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def shape_text(self) -> str:
        kind = "grayscale (1 channel)" if self.channels == 1 else "RGB (3 channels)"
        return f"{self.width}x{self.height} {kind}"

    def from_pil(self, image: Image.Image, source: str) -> np.ndarray:
        """One decoded image -> uint8 (H, W, C) of the stored size, or InputError."""
        if self.channels == 1 and image.mode not in GRAY_MODES:
            rgb = np.asarray(image.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):  # grey saved as RGB is grey
                raise InputError(f"{source}: a colour image (mode {image.mode}); the model takes {self.shape_text()} images")
            image = Image.fromarray(np.ascontiguousarray(rgb[..., 0]))
        image = fit_image(image.convert(self.mode), self.height, self.width)  # as extend fits the images it adds
        array = np.asarray(image, dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        return self.check(array, source)

    def check(self, array: np.ndarray, source: str) -> np.ndarray:
        h, w, c = array.shape
        if c != self.channels:
            raise InputError(f"{source}: {c} channel(s); the model takes {self.shape_text()} images")
        if (h, w) != (self.height, self.width):
            raise InputError(f"{source}: {w}x{h} pixels; the model takes {self.shape_text()} images")
        return array

    def from_array(self, images: np.ndarray, source: str) -> np.ndarray:
        """uint8 (N, H, W) or (N, H, W, C) -> uint8 (N, H, W, C) of the stored size, or InputError."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise InputError(f"{source}: images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype}")
        if images.ndim == 3 and self.channels == 1:
            images = images[..., None]
        if images.ndim != 4:
            raise InputError(f"{source}: images must be uint8 (N, H, W) for a grayscale model or (N, H, W, C), "
                             f"got shape {images.shape}; the model takes {self.shape_text()} images")
        if images.shape[-1] == self.channels and images.shape[1:3] != (self.height, self.width):
            return np.stack([self.from_pil(Image.fromarray(im.squeeze(-1) if self.channels == 1 else im),
                                           f"{source}[{i}]") for i, im in enumerate(images)]) if len(images) else \
                np.zeros((0, self.height, self.width, self.channels), np.uint8)
        if len(images):
            self.check(images[0], f"{source}[0]")
        return images


# -- where the images come from ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: str


@dataclass(frozen=True)
class _Array:
    images: np.ndarray  # already checked and prepared: uint8 (N, H, W, C)
    source: str


def _npz_images(path: Path) -> np.ndarray:
    """The images of an .npz: ``x``, ``images`` or ``x_test`` (the first present), or its only array."""
    from cilkit.data.readers import _npz_images as as_uint8  # uint8 or float in [0, 1], NHW or NHWC

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            key = next((k for k in ("x", "images", "x_test") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InputError(f"{path}: an .npz of images needs an array x, images or x_test (or a single array), "
                                 f"found {', '.join(keys) or 'none'}")
            array = npz[key]
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - not a zip, a pickled object array, truncated ...
        raise InputError(f"cannot read {path} as an .npz of images ({type(e).__name__}: {e})") from None
    try:
        return as_uint8(array, key, path)
    except CilkitError as e:
        raise InputError(str(e)) from None


def _image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (by extension, hidden files and folders left out, links to folders not
    followed), sorted by path. Plain strings and scandir: Path objects cost seconds for 100k files."""
    found, todo = [], [folder]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(e.path)
    return sorted(found)


def collect(inputs: Sequence, prep: Preprocess) -> list[_File | _Array]:
    """Image files, folders (their image files, recursively, sorted), .npz files and arrays, in order."""
    items: list[_File | _Array] = []
    missing = []
    for i, item in enumerate(inputs):
        if isinstance(item, (np.ndarray, torch.Tensor)):
            array = item.cpu().numpy() if isinstance(item, torch.Tensor) else item
            items.append(_Array(prep.from_array(array, f"images[{i}]" if len(inputs) > 1 else "images"), "images"))
            continue
        path = Path(item)
        if path.is_dir():
            found = _image_files(str(path))
            if not found:
                raise InputError(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            items += [_File(f) for f in found]
        elif path.is_file() and path.suffix.lower() == ".npz":
            items.append(_Array(prep.from_array(_npz_images(path), str(path)), str(path)))
        elif path.is_file():
            items.append(_File(str(path)))
        else:
            missing.append(str(path))
    if missing:
        raise InputError(f"no such file or folder: {', '.join(missing[:_MAX_LISTED])}"
                         + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""))
    if not items:
        raise InputError("no images given")
    return items


def _decode(path: str, prep: Preprocess) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return prep.from_pil(image, path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken file can make PIL raise almost anything
        raise InputError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from None


def _gather(entries: list[tuple[str, object]], prep: Preprocess) -> np.ndarray:
    """uint8 (n, H, W, C) of one batch of (source, path or prepared image); every bad file of the batch is
    named in one InputError."""
    out = np.zeros((len(entries), prep.height, prep.width, prep.channels), dtype=np.uint8)
    bad = []
    for i, (_, what) in enumerate(entries):
        if isinstance(what, np.ndarray):
            out[i] = what
            continue
        try:
            out[i] = _decode(what, prep)
        except InputError as e:
            bad.append(str(e))
    if bad:
        more = f"\n  and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise InputError(f"{len(bad)} image(s) cannot be used:\n  " + "\n  ".join(bad[:_MAX_LISTED]) + more)
    return out


def batches(items: list[_File | _Array], prep: Preprocess, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(sources, uint8 NHWC) batches in the order given; the next batch is decoded in a thread while this
    one runs through the model (PIL decodes without holding the GIL)."""
    entries: list[tuple[str, object]] = []
    for item in items:
        if isinstance(item, _File):
            entries.append((item.path, item.path))
        else:
            entries += [(f"{item.source}[{j}]", image) for j, image in enumerate(item.images)]
    chunks = [entries[start: start + batch_size] for start in range(0, len(entries), batch_size)]
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(_gather, chunks[0], prep)] if chunks else []
        for i, chunk in enumerate(chunks):
            if i + 1 < len(chunks):
                futures.append(pool.submit(_gather, chunks[i + 1], prep))
            try:
                x = futures[i].result()
            except BaseException:
                for f in futures[i + 1:]:
                    f.cancel()
                raise
            futures[i] = None
            yield [source for source, _ in chunk], x
