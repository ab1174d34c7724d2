"""Decoding folders of image files once, in parallel, into a cached uint8 array.

Tiny-ImageNet and image folders are thousands of small files: they are decoded by a process pool
(resized and centre-cropped when a size is given) and cached as ``.npz``, so later runs load one file.
The cache lies in the folder given to the reader (``cache_dir``), else in ``$CILKIT_CACHE``, else next
to the data (``<data>/.cilkit-cache``) when that is writable, else in ``~/.cache/cilkit``. It is keyed by
the files' relative paths, sizes and modification times and by the decode size, written atomically, and
the temporary files of an interrupted write are removed on the next start.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cilkit.errors import DatasetError

log = logging.getLogger("cilkit")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
CACHE_DIR = ".cilkit-cache"
CACHE_ENV = "CILKIT_CACHE"  # a folder for the caches of every dataset, instead of <data>/.cilkit-cache
_CACHE_VERSION = 2  # part of the cache key: bump when the decoded arrays change for the same files
_STALE_TMP_S = 600  # a temporary cache file unchanged this long belongs to a dead write
_POOL_MIN_FILES = 2048  # below this, decoding in-process beats starting worker processes
_POOL_CHUNK = 1000
_MAX_LISTED = 20  # corrupt files named in one error; the rest are counted


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bilinear) to cover ``height`` x ``width``, then crop the centre ``height`` x ``width``: the one
    resize of cilkit, for an image folder's ``data.image_size``, the images ``extend`` adds and ``predict`` reads."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - width) // 2, (nh - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear), then crop the centre ``size`` x ``size``."""
    return fit_image(image, size, size)


def _decode_chunk(job: tuple[list[str], int | None, tuple[int, int, int]]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode image files to one uint8 (n, H, W, 3) array of the expected ``shape`` per image.

    Files that cannot be decoded (or decode to another shape) are listed as ``(path, why)`` and left as
    zeros, so that one call reports every bad file of the chunk.
    """
    paths, size, shape = job
    out = np.zeros((len(paths), *shape), dtype=np.uint8)
    failures: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            array = np.asarray(resize_center_crop(rgb, size) if size else rgb, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - a broken file can make PIL raise almost anything
            failures.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        if array.shape != shape:
            failures.append((path, f"decodes to {_wxh(array.shape)} pixels, the others to {_wxh(shape)}"))
            continue
        out[i] = array
    return out, failures


def _wxh(shape: tuple[int, ...]) -> str:
    """``WxH`` of an (H, W, ...) shape."""
    return f"{shape[1]}x{shape[0]}"


def _progress(total: int, desc: str):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    try:
        shown = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        shown = False
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not shown, mininterval=1.0, leave=False)


def corrupt_files_error(failures: list[tuple[str, str]], total: int) -> DatasetError:
    """One DatasetError listing the files that cannot be decoded (the first ``_MAX_LISTED``, then a count)."""
    lines = [f"  {path}: {why}" for path, why in failures[:_MAX_LISTED]]
    if len(failures) > _MAX_LISTED:
        lines.append(f"  and {len(failures) - _MAX_LISTED} more")
    return DatasetError(f"cannot decode {len(failures)} of {total} image files (expected readable images, by extension "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove or replace them:\n" + "\n".join(lines))


def image_sizes(paths: list[str]) -> tuple[dict[tuple[int, int], list[str]], list[tuple[str, str]]]:
    """The files of each (width, height), from the image headers only (no decoding), and the unreadable ones."""
    sizes: dict[tuple[int, int], list[str]] = {}
    failures: list[tuple[str, str]] = []
    with _progress(len(paths), "reading image sizes") as bar:
        for path in paths:
            try:
                with Image.open(path) as image:
                    wh = image.size
            except Exception as exc:  # noqa: BLE001
                failures.append((path, f"{type(exc).__name__}: {exc}"))
            else:
                sizes.setdefault(wh, []).append(path)
            bar.update()
    return sizes, failures


def native_shape(paths: list[str], where: Path, size_field: str | None = None) -> tuple[int, int, int]:
    """(H, W, 3) shared by all images, or DatasetError listing the sizes seen (and what to set).

    Files whose header cannot be read are left to the decoding, which lists them with any other bad file.
    """
    sizes, failures = image_sizes(paths)
    if not sizes:
        raise corrupt_files_error(failures, len(paths))
    if len(sizes) > 1:
        seen = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        listed = ", ".join(f"{w}x{h} ({len(files)} file{'s' * (len(files) > 1)}, e.g. {files[0]})" for (w, h), files in seen[:10])
        more = f" and {len(seen) - 10} more sizes" if len(seen) > 10 else ""
        hint = (f"set {size_field} to resize and centre-crop them all to one square size" if size_field
                else "expected one size for all images")
        unreadable = f" ({len(failures)} more files cannot be read)" if failures else ""
        raise DatasetError(f"images under {where} differ in size (width x height): {listed}{more}{unreadable}; {hint}")
    (w, h), = sizes
    return (h, w, 3)


def available_memory() -> int | None:
    """Bytes of memory this process can still use, or None when unknown.

    psutil's ``available`` if installed, else Linux's MemAvailable (free plus reclaimable page cache),
    else ``SC_AVPHYS_PAGES * SC_PAGE_SIZE``; capped by a cgroup v2 memory limit (containers, SLURM).
    """
    found = None
    try:
        import psutil

        found = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                found = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            try:
                found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                found = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def _gib(n: float) -> str:
    """A byte count in GiB, MiB or KiB."""
    unit = next((u for u, p in (("GiB", 30), ("MiB", 20)) if n >= 2**p), "KiB")
    return f"{n / 2**{'GiB': 30, 'MiB': 20, 'KiB': 10}[unit]:.1f} {unit}"


def check_memory(n: int, shape: tuple[int, int, int], where: Path, size_field: str | None = None) -> None:
    """DatasetError before decoding when ``n`` uint8 images of ``shape`` do not fit in the available memory."""
    need = n * math.prod(shape)
    free = available_memory()
    if free is None or need <= free:
        return
    hint = "free some memory or use a lower-resolution copy of the images"
    if size_field:
        fits = math.isqrt(max(free, 0) // max(3 * n, 1))
        hint = f"set {size_field} to a smaller size" + (f" (at most {fits} fits: {fits}x{fits} needs "
                                                         f"{_gib(n * fits * fits * 3)})" if fits >= 1 else "")
    raise DatasetError(f"not enough memory to decode the images under {where}: {n} images of {_wxh(shape)} pixels "
                       f"need {_gib(need)} as uint8 ({n} x {shape[0]} x {shape[1]} x 3 bytes, train and test), "
                       f"but only {_gib(free)} is available; {hint}")


def decode_images(paths: list[str], size: int | None, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Decode ``paths`` in order, in a process pool of ``os.cpu_count()`` workers when there are many.

    ``shape`` is the (H, W, 3) of every decoded image: ``(size, size, 3)`` when a size is given, else the
    images' own size, read from their headers when not given. The result is filled in place (no copy).
    Progress goes to stderr (a bar on a terminal) and to the log (start and end). Every file that cannot
    be decoded is listed in one DatasetError.
    Workers are forked where possible: unlike spawn, fork neither re-runs the caller's main script
    nor needs ``cilkit`` importable from the environment; the workers only run PIL and numpy.
    """
    if shape is None:
        shape = (size, size, 3) if size else native_shape(paths, Path(os.path.commonpath(paths)) if paths else Path())
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    workers = os.cpu_count() or 1
    serial = len(paths) < _POOL_MIN_FILES or workers == 1
    failures: list[tuple[str, str]] = []
    began = time.perf_counter()
    log.info("decoding %d images to %s pixels (%s)", len(paths), _wxh(shape),
             "in this process" if serial else f"{workers} worker processes")
    jobs = [(paths[i:i + _POOL_CHUNK], size, shape) for i in range(0, len(paths), _POOL_CHUNK)]
    with _progress(len(paths), "decoding images") as bar:
        if serial:
            results = map(_decode_chunk, jobs)
            _fill(out, results, failures, bar)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            try:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                    _fill(out, pool.map(_decode_chunk, jobs), failures, bar)
            except BrokenProcessPool as exc:
                raise DatasetError(f"a process decoding the images died ({exc}), most likely out of memory: "
                                   f"{len(paths)} images of {_wxh(shape)} pixels need "
                                   f"{_gib(len(paths) * math.prod(shape))}; decode them to a smaller size") from exc
    if failures:
        raise corrupt_files_error(failures, len(paths))
    log.info("decoded %d images in %.1f s", len(paths), time.perf_counter() - began)
    return out


def _fill(out: np.ndarray, results, failures: list[tuple[str, str]], bar) -> None:
    """Copy decoded chunks into ``out`` in order, gathering their failures."""
    start = 0
    for chunk, bad in results:
        out[start:start + len(chunk)] = chunk
        start += len(chunk)
        failures += bad
        bar.update(len(chunk))


def cache_folder(tree: Path, cache_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The folder of the cache of ``tree``, and whether it is shared between trees (then names carry a hash).

    ``cache_dir``, else ``$CILKIT_CACHE``, else ``tree/.cilkit-cache`` when it is writable, else
    ``~/.cache/cilkit``.
    """
    chosen = cache_dir or os.environ.get(CACHE_ENV) or None
    if chosen:
        return Path(chosen).expanduser(), True
    folder = tree / CACHE_DIR
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder, False
    except OSError:
        pass
    return Path.home() / ".cache" / "cilkit", True


def _cache_file(tree: Path, filename: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<folder>/filename``, or ``<folder>/<stem>-<hash of the tree's path>.npz`` in a shared folder."""
    folder, shared = cache_folder(tree, cache_dir)
    if not shared:
        return folder / filename
    stem, suffix = os.path.splitext(filename)
    digest = hashlib.sha1(str(tree.resolve()).encode()).hexdigest()[:16]
    return folder / f"{stem}-{digest}{suffix}"


def cache_key(tree: Path, train: list[str], test: list[str], size: int | None) -> str:
    """A digest of what the cached arrays depend on: every file's path relative to ``tree``, its size and
    modification time (``st_size``, ``st_mtime_ns``), the split it is in, its position, and the decode size."""
    digest = hashlib.sha256(f"cilkit-imagecache-v{_CACHE_VERSION}\nsize={size or 'native'}\n".encode())
    prefix = str(tree).rstrip(os.sep) + os.sep
    for split, files in (("train", train), ("test", test)):
        digest.update(f"{split} {len(files)}\n".encode())
        for path in files:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise DatasetError(f"cannot read image {path}: {exc}") from exc
            rel = path[len(prefix):] if path.startswith(prefix) else path
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_cache(path: Path, key: str, sizes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (train, test) images if the cache was written for ``key`` and has the expected counts."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            if "key" not in cache.files or str(cache["key"]) != key:
                return None
            x_train, x_test = cache["x_train"], cache["x_test"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError):  # too big: check_memory says so
        return None
    return (x_train, x_test) if (len(x_train), len(x_test)) == sizes else None


def _owner() -> str:
    """``<host>-<pid>`` of this process, as it appears in the names of its temporary cache files."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}-{os.getpid()}"


_TMP_RE = re.compile(r"^\..+\.npz\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[^.]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files that killed writes of the cache left in ``folder``.

    A temporary file is stale when the process that wrote it (its name holds host and pid) is gone from
    this host, or when it has not changed for ``_STALE_TMP_S`` seconds (another host, or an older name).
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    host = _owner().rsplit("-", 1)[0]
    now = time.time()
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            dead = m["host"] == host and os.name == "posix" and not _pid_alive(int(m["pid"]))
            if dead or now - st.st_mtime > _STALE_TMP_S:
                os.unlink(entry.path)
                log.info("removed %s, a temporary file (%s) left by an interrupted write of the decoded-image cache",
                         entry.path, _gib(st.st_size))
        except OSError:
            continue


def _write_cache(path: Path, key: str, x_train: np.ndarray, x_test: np.ndarray) -> None:
    """Write the cache atomically (temp file in the same folder, then rename); warn on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need, free = x_train.nbytes + x_test.nbytes, shutil.disk_usage(path.parent).free
        if need > free:
            raise OSError(f"it needs {_gib(need)} but only {_gib(free)} is free on that disk")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), x_train=x_train, x_test=x_test)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"could not write the decoded-image cache {path}: {exc}; set {CACHE_ENV} to a writable folder "
                      f"with enough space", stacklevel=3)
    finally:
        if tmp is not None:  # failed or interrupted (KeyboardInterrupt): no orphan
            Path(tmp).unlink(missing_ok=True)


def decode_cached(tree: Path, filename: str, train: list[str], test: list[str], size: int | None, *,
                  size_field: str | None = None, cache_dir: str | os.PathLike | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Train and test images of the given files, from the cache when it is fresh, else decoded and cached.

    ``size``: resize and centre-crop to ``size`` x ``size``; None: the images' own size, which they must
    share. ``size_field`` names the config key of the size, for the hints of the error messages.
    ``cache_dir``: the cache folder (see :func:`cache_folder`). The cache is fresh when it was written for
    the same files (relative paths, sizes, modification times) and the same size.
    """
    cache = _cache_file(tree, filename, cache_dir)
    remove_stale_temps(cache.parent)
    key = cache_key(tree, train, test, size)
    cached = _read_cache(cache, key, (len(train), len(test)))
    if cached is not None:
        log.info("images of %s: %d at %s pixels, from the cache %s", tree, len(train) + len(test),
                 _wxh(cached[0].shape[1:]), cache)
        return cached
    paths = train + test
    shape = (size, size, 3) if size else native_shape(paths, tree, size_field)
    source = f"{size_field or 'the requested size'}" if size else "their own size"
    log.info("images of %s: %s pixels (%s)", tree, _wxh(shape), source)
    check_memory(len(paths), shape, tree, size_field)
    images = decode_images(paths, size, shape)
    x_train, x_test = images[:len(train)], images[len(train):]
    _write_cache(cache, key, x_train, x_test)
    return x_train, x_test


def image_files(folder: Path) -> list[str]:
    """Sorted image files (by extension, case-insensitive, not hidden) directly inside ``folder``.

    Plain strings, not Paths: building and sorting 100k Path objects costs seconds.
    """
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
