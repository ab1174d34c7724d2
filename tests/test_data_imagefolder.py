"""ImageFolder reader: layout checks, the decode size, the memory estimate (tiny generated folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cilkit.data.readers import load_imagefolder
from cilkit.errors import DatasetError


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
