"""ImageFolder reader: layout checks, the decode size, the memory estimate (tiny generated folders)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from cilkit.data import imagecache
from cilkit.data.readers import load_imagefolder
from cilkit.data.registry import load_dataset
from cilkit.errors import ConfigError, DatasetError


def solid(path: Path, colour=(255, 0, 0), size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_folder(root: Path, classes=("cat", "dog"), test="test", size=(4, 4), per_class=2) -> None:
    for split in ("train", test):
        for c in classes:
            for i in range(per_class):
                solid(root / split / c / f"{i}.png", size=size)


def test_class_missing_from_test_is_refused(tmp_path):
    make_folder(tmp_path)
    solid(tmp_path / "train" / "cow" / "0.png")
    with pytest.raises(DatasetError, match="no test data") as info:
        load_imagefolder(tmp_path, 4)
    assert "cow" in str(info.value) and str(tmp_path / "test") in str(info.value)


def test_class_missing_from_train_is_refused(tmp_path):
    make_folder(tmp_path, test="val")
    solid(tmp_path / "val" / "cow" / "0.png")
    with pytest.raises(DatasetError, match="cow") as info:
        load_imagefolder(tmp_path, 4)
    assert str(tmp_path / "val") in str(info.value) and str(tmp_path / "train") in str(info.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_class_folder_without_images_is_refused(tmp_path, split):
    make_folder(tmp_path)
    for p in (tmp_path / split / "dog").iterdir():
        p.unlink()
    (tmp_path / split / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="without images") as info:
        load_imagefolder(tmp_path, 4)
    assert str(tmp_path / split / "dog") in str(info.value)


def test_all_problems_in_one_message(tmp_path):
    make_folder(tmp_path)
    solid(tmp_path / "train" / "cow" / "0.png")
    solid(tmp_path / "test" / "emu" / "0.png")
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "test" / "eel").mkdir()
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path, 4)
    message = str(info.value)
    assert "cow" in message and "emu" in message
    assert str(tmp_path / "train" / "eel") in message and str(tmp_path / "test" / "eel") in message


# ------------------------------------------------------------------------------ decode size, memory

def test_no_size_keeps_the_images_own_size_and_logs_it(tmp_path, caplog):
    make_folder(tmp_path, size=(6, 5))
    with caplog.at_level(logging.INFO, logger="cilkit"):
        d = load_imagefolder(tmp_path, None)
    assert d.train.images.shape == (4, 5, 6, 3) and d.test.images.shape == (4, 5, 6, 3)
    assert any("6x5" in r.getMessage() and "own size" in r.getMessage() for r in caplog.records)


def test_registry_default_is_the_images_own_size(tmp_path):
    make_folder(tmp_path, size=(3, 3))
    d = load_dataset("imagefolder", str(tmp_path))
    assert d.train.images.shape[1:] == (3, 3, 3)


def test_mixed_sizes_without_a_size_say_what_to_set(tmp_path):
    make_folder(tmp_path, size=(4, 4))
    solid(tmp_path / "train" / "dog" / "big.png", size=(6, 5))
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path)
    message = str(info.value)
    assert "4x4 (8 files" in message and "6x5 (1 file," in message and str(tmp_path / "train" / "dog" / "big.png") in message
    assert "data.image_size" in message
    d = load_imagefolder(tmp_path, 3)  # a size makes them one size
    assert d.train.images.shape == (5, 3, 3, 3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_bad_image_size_is_a_config_error(tmp_path, bad):
    make_folder(tmp_path)
    with pytest.raises(ConfigError, match="data.image_size"):
        load_imagefolder(tmp_path, bad)


def test_not_enough_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    make_folder(tmp_path, size=(32, 32))
    monkeypatch.setattr(imagecache, "available_memory", lambda: 8 * 100 * 100 * 3)  # 8 images of 100x100

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the images do not fit in memory")

    monkeypatch.setattr(imagecache, "decode_images", refuse)
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path, 224)
    message = str(info.value)
    assert "8 images of 224x224" in message and "need 1.1 MiB" in message and "only 234.4 KiB is available" in message
    assert "data.image_size" in message and "at most 100 fits" in message
    monkeypatch.undo()
    assert load_imagefolder(tmp_path, None).train.images.shape == (4, 32, 32, 3)


def test_available_memory_is_a_positive_number():
    free = imagecache.available_memory()
    assert free is None or free > 0
