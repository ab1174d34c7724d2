"""The decoded-image cache: its key, its location and the temporary files of interrupted writes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cilkit.data import imagecache
from cilkit.data.readers import load_imagefolder, load_tinyimagenet
from cilkit.data.registry import load_dataset

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    monkeypatch.delenv("CILKIT_CACHE", raising=False)


def solid(path: Path, colour=RED, size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_folder(root: Path) -> None:
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            solid(root / split / c / "0.png")


def refuse_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagecache, "decode_images", refuse)


# ------------------------------------------------------------------------------------ (b) the key

def test_image_replaced_in_place_is_decoded_again(tmp_path, monkeypatch):
    make_folder(tmp_path)
    first = load_imagefolder(tmp_path, 4)
    assert tuple(first.test.images[1, 0, 0]) == RED
    with monkeypatch.context() as m:
        refuse_decoding(m)
        load_imagefolder(tmp_path, 4)  # nothing changed: from the cache
    image = tmp_path / "test" / "dog" / "0.png"
    stat = image.stat()
    solid(image, BLUE)  # same name, same folder, same byte size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    for folder in (image.parent, image.parent.parent):  # folder times as before: only the file tells
        os.utime(folder, ns=(folder.stat().st_atime_ns, folder.stat().st_mtime_ns - 10**10))
    again = load_imagefolder(tmp_path, 4)
    assert tuple(again.test.images[1, 0, 0]) == BLUE and tuple(again.test.images[0, 0, 0]) == RED


def test_cache_key_covers_paths_sizes_times_and_decode_size(tmp_path):
    make_folder(tmp_path)
    files = [str(p) for p in sorted(tmp_path.rglob("*.png"))]
    key = imagecache.cache_key(tmp_path, files[:2], files[2:], 4)
    assert key == imagecache.cache_key(tmp_path, files[:2], files[2:], 4)
    assert key != imagecache.cache_key(tmp_path, files[:2], files[2:], 5)
    assert key != imagecache.cache_key(tmp_path, files[:2], files[2:], None)
    assert key != imagecache.cache_key(tmp_path, files[:3], files[3:], 4)
    # relative paths: the same tree copied elsewhere has the same key
    moved = tmp_path.parent / (tmp_path.name + "-copy")
    os.rename(tmp_path, moved)
    moved_files = [f.replace(str(tmp_path), str(moved), 1) for f in files]
    assert key == imagecache.cache_key(moved, moved_files[:2], moved_files[2:], 4)
    os.truncate(moved_files[0], 10)
    assert key != imagecache.cache_key(moved, moved_files[:2], moved_files[2:], 4)


# ---------------------------------------------------------------------------------- (c) location

def test_cache_goes_where_cilkit_cache_says(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_folder(data)
    monkeypatch.setenv("CILKIT_CACHE", str(cache))
    d = load_imagefolder(data, 4)
    assert not (data / ".cilkit-cache").exists()
    written = list(cache.glob("imagefolder-4-*.npz"))
    assert len(written) == 1
    with monkeypatch.context() as m:
        refuse_decoding(m)
        assert np.array_equal(load_imagefolder(data, 4).train.images, d.train.images)


def test_cache_dir_parameter_wins_and_goes_through_the_registry(tmp_path, monkeypatch):
    data, env, chosen = tmp_path / "data", tmp_path / "env", tmp_path / "chosen"
    make_folder(data)
    monkeypatch.setenv("CILKIT_CACHE", str(env))
    load_dataset("imagefolder", str(data), image_size=4, cache_dir=str(chosen))
    assert len(list(chosen.glob("*.npz"))) == 1 and not env.exists() and not (data / ".cilkit-cache").exists()


def test_default_is_next_to_the_data_else_home(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    load_imagefolder(tmp_path / "data", 4)
    assert (tmp_path / "data" / ".cilkit-cache" / "imagefolder-4.npz").is_file()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(imagecache.os, "access", lambda path, mode: False)
    load_imagefolder(tmp_path / "data", 4)
    assert len(list((tmp_path / "home" / ".cache" / "cilkit").glob("imagefolder-4-*.npz"))) == 1


# ------------------------------------------------------------------------ (a) interrupted writes

def _write_and_die(path: str) -> None:
    """In a child process: start writing the cache, then get SIGKILLed in the middle of the write."""
    def savez_then_die(f, **arrays):
        f.write(b"\0" * 100_000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    imagecache.np.savez = savez_then_die
    imagecache._write_cache(Path(path), "key", np.zeros((2, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8))


@pytest.mark.skipif(os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_orphan_of_a_killed_write_is_removed_on_the_next_start(tmp_path):
    make_folder(tmp_path)
    cache = tmp_path / ".cilkit-cache"
    cache.mkdir()
    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(str(cache / "imagefolder-4.npz"),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    orphans = list(cache.glob(".imagefolder-4.npz.*.tmp"))
    assert len(orphans) == 1 and orphans[0].stat().st_size == 100_000
    legacy = cache / ".imagefolder-32.npz.k2j4_x9a.tmp"  # the name an older cilkit gave it, long unchanged
    legacy.write_bytes(b"\0" * 10)
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    load_imagefolder(tmp_path, 4)
    assert not list(cache.glob("*.tmp")) and (cache / "imagefolder-4.npz").is_file()


def test_a_write_in_progress_is_left_alone(tmp_path):
    make_folder(tmp_path)
    cache = tmp_path / ".cilkit-cache"
    cache.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = imagecache._owner().rsplit("-", 1)[0]
        live = cache / f".imagefolder-4.npz.{host}-{sleeper.pid}.abc123.tmp"
        other_host = cache / ".imagefolder-4.npz.elsewhere-1.abc123.tmp"
        live.write_bytes(b"\0")
        other_host.write_bytes(b"\0")
        unrelated = cache / "notes.tmp"
        unrelated.write_text("not ours")
        load_imagefolder(tmp_path, 4)
        assert live.exists() and other_host.exists() and unrelated.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    make_folder(tmp_path)

    def interrupted(f, **arrays):
        f.write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(imagecache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_imagefolder(tmp_path, 4)
    assert not list((tmp_path / ".cilkit-cache").glob("*.tmp"))
    assert not (tmp_path / ".cilkit-cache" / "imagefolder-4.npz").exists()


def test_tinyimagenet_takes_a_cache_dir(tmp_path):
    tree = tmp_path / "tiny"
    tree.mkdir()
    (tree / "wnids.txt").write_text("n01\n")
    solid(tree / "train" / "n01" / "images" / "a.png")
    solid(tree / "val" / "images" / "v.png")
    (tree / "val" / "val_annotations.txt").write_text("v.png\tn01\t0\t0\t1\t1\n")
    d = load_tinyimagenet(tree, cache_dir=tmp_path / "c")
    assert len(d.train) == 1 and len(list((tmp_path / "c").glob("tinyimagenet-*.npz"))) == 1
