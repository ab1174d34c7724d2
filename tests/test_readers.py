"""Dataset readers on tiny generated data in every supported format."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cilkit.data import imagecache
from cilkit.data.readers import load_cifar, load_digits, load_idx, load_imagefolder, load_numpy, load_tinyimagenet
from cilkit.errors import DatasetError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    """The tests look for the decoded-image cache at its default place."""
    monkeypatch.delenv("CILKIT_CACHE", raising=False)


# ------------------------------------------------------------------------------------------ digits

def test_digits_shapes_and_stratified_deterministic_split():
    d = load_digits()
    assert d.train.images.shape[1:] == (8, 8, 1) and d.train.images.dtype == np.uint8
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 360
    assert d.train.images.max() == 255 and d.class_names == [str(i) for i in range(10)]
    assert not d.natural_images
    assert set(np.unique(d.test.labels)) == set(range(10))
    share_test = np.bincount(d.test.labels) / len(d.test)
    share_train = np.bincount(d.train.labels) / len(d.train)
    assert np.abs(share_test - share_train).max() < 0.01
    again = load_digits()
    assert np.array_equal(again.test.images, d.test.images) and np.array_equal(again.train.labels, d.train.labels)
    assert np.allclose(d.mean, d.train.images.mean() / 255.0)


# --------------------------------------------------------------------------------------------- IDX

def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write ``array`` (uint8) as an IDX file with a real header, gzip-compressed when ``gz``."""
    header = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx(folder: Path, gz: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Four IDX files: 6 train and 4 test images of 5x4 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4)),
        "train-labels-idx1-ubyte": np.array([0, 1, 2, 9, 9, 3]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 5, 4)),
        "t10k-labels-idx1-ubyte": np.array([4, 5, 6, 7]),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,in_subfolder", [("mnist", True), ("fashion-mnist", False)])
def test_idx_round_trip(tmp_path, gz, name, in_subfolder):
    arrays = make_idx(tmp_path / name if in_subfolder else tmp_path, gz, np.random.default_rng(0))
    d = load_idx(tmp_path, name)
    assert d.train.images.shape == (6, 5, 4, 1) and d.test.images.shape == (4, 5, 4, 1)
    assert np.array_equal(d.train.images[..., 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(d.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert d.natural_images == (name == "fashion-mnist")
    assert d.class_names[0] == ("T-shirt/top" if name == "fashion-mnist" else "0") and len(d.class_names) == 10
    assert d.mean[0] == pytest.approx(arrays["train-images-idx3-ubyte"].mean() / 255.0)


@pytest.mark.parametrize("corrupt", ["magic", "truncated"])
def test_idx_bad_file_names_the_file(tmp_path, corrupt):
    make_idx(tmp_path / "mnist", False, np.random.default_rng(0))
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    data = bad.read_bytes()
    bad.write_bytes(struct.pack(">I", 0x801) + data[4:] if corrupt == "magic" else data[:-3])
    with pytest.raises(DatasetError, match="magic" if corrupt == "magic" else "truncated") as info:
        load_idx(tmp_path, "mnist")
    assert str(bad) in str(info.value)


def _flip_middle(data: bytes) -> bytes:
    """Invert 30 bytes in the middle of a file: a corrupt deflate stream once gzipped."""
    mid = len(data) // 2
    return data[:mid - 15] + bytes(b ^ 0xFF for b in data[mid - 15:mid + 15]) + data[mid + 15:]


def _gz_with(payload_edit):
    """A corruption of a .gz IDX file that edits the decompressed bytes, then re-compresses them."""
    return lambda data: gzip.compress(payload_edit(gzip.decompress(data)))


@pytest.mark.parametrize("corrupt,match", [
    ("deflate", "corrupt or truncated"),          # zlib.error before the fix
    ("gz-truncated", "corrupt or truncated"),     # EOFError
    ("not-gzip", "corrupt or truncated"),         # BadGzipFile
    ("crc", "corrupt or truncated"),
    ("magic", "magic"),
    ("short", "truncated or oversized"),
    ("oversized", "truncated or oversized"),
    ("header-only", "truncated or oversized"),
])
def test_data_idx_corrupt_gz_names_the_file(tmp_path, corrupt, match):
    make_idx(tmp_path / "mnist", True, np.random.default_rng(0))
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    # a bigger, compressible file, so the middle of the deflate stream is Huffman-coded data
    write_idx(bad.with_suffix(""), np.tile(np.arange(256), 6 * 50 * 40 // 256 + 1)[:6 * 50 * 40].reshape(6, 50, 40), True)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(6), True)
    edits = {
        "deflate": _flip_middle,
        "gz-truncated": lambda d: d[:len(d) // 2],
        "not-gzip": lambda d: b"<html>not found</html>",
        "crc": lambda d: d[:-8] + bytes(4) + d[-4:],
        "magic": _gz_with(lambda d: struct.pack(">I", 0x801) + d[4:]),
        "short": _gz_with(lambda d: d[:-3]),
        "oversized": _gz_with(lambda d: d + b"xyz"),
        "header-only": _gz_with(lambda d: d[:6]),
    }
    bad.write_bytes(edits[corrupt](bad.read_bytes()))
    if corrupt == "deflate":
        with pytest.raises(zlib.error):  # the case that ended in a traceback
            gzip.decompress(bad.read_bytes())
    with pytest.raises(DatasetError, match=match) as info:
        load_idx(tmp_path, "mnist")
    assert str(bad) in str(info.value)


def test_idx_missing_names_both_places(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_idx(tmp_path, "fashion-mnist")
    assert str(tmp_path / "fashion-mnist") in str(info.value) and "train-images-idx3-ubyte" in str(info.value)


# ------------------------------------------------------------------------------------------- CIFAR

def dump(path: Path, content: dict, byte_keys: bool) -> None:
    """Pickle a CIFAR dict, with bytes keys (as the official Python 2 pickles decode) or str keys."""
    with open(path, "wb") as f:
        pickle.dump({k.encode() if byte_keys else k: v for k, v in content.items()}, f)


def chw_rows(n: int, seed: int) -> np.ndarray:
    """``n`` random CIFAR rows (3072 bytes, CHW order)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_layout_pixels_and_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = [chw_rows(2, i) for i in range(6)]
    rows[1][1, 2 * 1024 + 3 * 32 + 5] = 7  # image 3 overall, channel 2, y=3, x=5
    for i in range(5):
        dump(folder / f"data_batch_{i + 1}", {"data": rows[i], "labels": [i, 9 - i]}, byte_keys=True)
    dump(folder / "test_batch", {"data": rows[5], "labels": [3, 4]}, byte_keys=True)
    dump(folder / "batches.meta", {"label_names": [f"c{i}".encode() for i in range(10)]}, byte_keys=True)
    d = load_cifar(tmp_path, "cifar10")
    assert d.train.images.shape == (10, 32, 32, 3) and d.test.images.shape == (2, 32, 32, 3)
    assert d.train.images[3, 3, 5, 2] == 7
    assert np.array_equal(d.train.images[0], rows[0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert d.train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and d.test.labels.tolist() == [3, 4]
    assert d.class_names == [f"c{i}" for i in range(10)] and d.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = chw_rows(4, 0), chw_rows(4, 1)
    train[2, 1024 + 31 * 32 + 0] = 200  # image 2, channel 1 (green), y=31, x=0
    dump(folder / "train", {"data": train, "fine_labels": [5, 99, 0, 1], "coarse_labels": [0] * 4}, byte_keys=False)
    dump(folder / "test", {"data": test, "fine_labels": [1, 2, 3, 4], "coarse_labels": [0] * 4}, byte_keys=False)
    dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]}, byte_keys=False)
    d = load_cifar(tmp_path, "cifar100")
    assert d.train.images[2, 31, 0, 1] == 200 and d.train.labels.tolist() == [5, 99, 0, 1]
    assert d.n_classes == 100 and d.class_names[99] == "f99" and d.std == (0.2675, 0.2565, 0.2761)


def test_cifar_missing_folder_names_path(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_cifar(tmp_path, "cifar100")
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "--download" in message


def test_cifar_bad_label_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="batches.meta"):
        load_cifar(tmp_path, "cifar10")


# --------------------------------------------------------------------------------- Tiny-ImageNet

def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> None:
    """Save a solid-colour image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_tiny(tree: Path) -> None:
    """3 wnids (listed unsorted), 2 PNG train images each, 3 val images; words.txt for two of them."""
    colours = {"n03": RED, "n01": GREEN, "n02": BLUE}
    tree.mkdir(parents=True)
    (tree / "wnids.txt").write_text("n03\nn01\nn02\n")
    (tree / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn03\ttabby, tabby cat\nn99\tother\n")
    for wnid, colour in colours.items():
        for i in range(2):
            solid(tree / "train" / wnid / "images" / f"{wnid}_{i}.PNG", colour)
        (tree / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    for i, wnid in enumerate(["n02", "n03", "n01"]):
        solid(tree / "val" / "images" / f"val_{i}.png", colours[wnid])
    (tree / "val" / "val_annotations.txt").write_text(
        "val_0.png\tn02\t0\t0\t3\t3\nval_1.png\tn03\t0\t0\t3\t3\nval_2.png\tn01\t1\t1\t2\t2\n")


def test_tinyimagenet_labels_names_and_cache(tmp_path, monkeypatch):
    tree = tmp_path / "tiny-imagenet-200"
    make_tiny(tree)
    d = load_tinyimagenet(tmp_path)
    assert d.class_names == ["goldfish", "n02", "tabby"] and d.meta["wnids"] == ["n01", "n02", "n03"]
    assert d.train.images.shape == (6, 4, 4, 3) and d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert tuple(d.train.images[0, 2, 2]) == GREEN and tuple(d.train.images[5, 0, 3]) == RED
    assert d.test.labels.tolist() == [1, 2, 0] and tuple(d.test.images[0, 1, 1]) == BLUE
    assert (tree / ".cilkit-cache" / "tinyimagenet.npz").is_file()

    def refuse(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(imagecache, "decode_images", refuse)
    again = load_tinyimagenet(tree)
    assert np.array_equal(again.train.images, d.train.images) and np.array_equal(again.test.labels, d.test.labels)


def test_tinyimagenet_cache_falls_back_to_home(tmp_path, monkeypatch):
    make_tiny(tmp_path / "tiny-imagenet-32")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(imagecache.os, "access", lambda path, mode: False)
    d = load_tinyimagenet(tmp_path)
    assert len(d.train) == 6
    assert len(list((tmp_path / "home" / ".cache" / "cilkit").glob("*.npz"))) == 1


def test_tinyimagenet_parallel_decode_matches(tmp_path, monkeypatch):
    make_tiny(tmp_path / "tiny")
    serial = load_tinyimagenet(tmp_path / "tiny")
    (tmp_path / "tiny" / ".cilkit-cache" / "tinyimagenet.npz").unlink()
    monkeypatch.setattr(imagecache, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(imagecache, "_POOL_CHUNK", 2)
    monkeypatch.setattr(imagecache.os, "cpu_count", lambda: 2)
    parallel = load_tinyimagenet(tmp_path / "tiny")
    assert np.array_equal(parallel.train.images, serial.train.images)
    assert np.array_equal(parallel.test.images, serial.test.images)
    (tmp_path / "tiny" / ".cilkit-cache" / "tinyimagenet.npz").unlink()
    solid(tmp_path / "tiny" / "val" / "images" / "val_2.png", GREEN, size=(4, 5))  # sizes are compared across chunks too
    with pytest.raises(DatasetError, match="differ in size"):
        load_tinyimagenet(tmp_path / "tiny")


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_tinyimagenet(tmp_path)
    assert str(tmp_path / "tiny-imagenet-200") in str(info.value) and "wnids.txt" in str(info.value)
    make_tiny(tmp_path / "tiny-imagenet-200")
    solid(tmp_path / "tiny-imagenet-200" / "train" / "n02" / "images" / "n02_9.png", BLUE, size=(5, 4))
    with pytest.raises(DatasetError, match="differ in size"):
        load_tinyimagenet(tmp_path)


# ------------------------------------------------------------------------------------ image folder

def test_imagefolder_val_split_resize_and_crop(tmp_path):
    wide = Image.new("RGB", (16, 8), RED)
    wide.paste(BLUE, (8, 0, 16, 8))  # left half red, right half blue
    (tmp_path / "train" / "dog").mkdir(parents=True)
    wide.save(tmp_path / "train" / "dog" / "wide.PNG")
    solid(tmp_path / "train" / "cat" / "a.jpg", GREEN, size=(6, 6))
    solid(tmp_path / "val" / "dog" / "b.bmp", BLUE, size=(3, 5))
    solid(tmp_path / "val" / "cat" / "c.png", GREEN, size=(5, 5))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load_imagefolder(tmp_path, 4)
    assert d.class_names == ["cat", "dog"] and d.train.labels.tolist() == [0, 1] and d.test.labels.tolist() == [0, 1]
    assert d.train.images.shape == (2, 4, 4, 3) and d.test.images.shape == (2, 4, 4, 3)
    crop = d.train.images[1].astype(int)  # 16x8 -> 8x4 -> centre columns 2..5: two red, two blue
    assert np.abs(crop[:, 0] - RED).max() <= 2 and np.abs(crop[:, 3] - BLUE).max() <= 2
    assert (tmp_path / ".cilkit-cache" / "imagefolder-4.npz").is_file()


def test_imagefolder_test_classes_must_be_subset(tmp_path):
    solid(tmp_path / "train" / "cat" / "a.png", GREEN)
    solid(tmp_path / "test" / "cow" / "b.png", GREEN)
    with pytest.raises(DatasetError, match="cow"):
        load_imagefolder(tmp_path, 4)
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path / "nowhere", 4)
    assert str(tmp_path / "nowhere" / "train") in str(info.value)


# ------------------------------------------------------------------------------------------ numpy

def test_numpy_grey_float_images_and_names(tmp_path):
    x_train = np.linspace(0, 1, 3 * 2 * 2).reshape(3, 2, 2)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x_train, y_train=np.array([0, 1, 1]), x_test=np.zeros((1, 2, 2, 1), np.uint8),
             y_test=np.array([1]), class_names=np.array(["a", "b"]))
    d = load_numpy(path)
    assert d.train.images.shape == (3, 2, 2, 1) and d.train.images.dtype == np.uint8
    assert d.train.images[0, 0, 0, 0] == 0 and d.train.images[-1, -1, -1, 0] == 255
    assert d.class_names == ["a", "b"] and d.test.labels.tolist() == [1]


@pytest.mark.parametrize("y_train", [[0, 2, 2], [-1, 0, 1], [0.0, 1.0, 1.0]])
def test_numpy_bad_labels(tmp_path, y_train):
    path = tmp_path / "bad.npz"
    images = np.zeros((3, 2, 2, 3), np.uint8)
    np.savez(path, x_train=images, y_train=np.array(y_train), x_test=images, y_test=np.array([0, 1, 0]))
    with pytest.raises(DatasetError, match="0..K-1") as info:
        load_numpy(path)
    assert str(path) in str(info.value)


def test_numpy_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="x_train") as info:
        load_numpy(tmp_path / "none.npz")
    assert str(tmp_path / "none.npz") in str(info.value)
