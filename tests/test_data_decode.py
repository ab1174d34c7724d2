"""Decoding folders of images: every corrupt file in one error, progress on stderr and in the log."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cilkit.data import imagecache
from cilkit.data.readers import load_imagefolder
from cilkit.errors import DatasetError


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    monkeypatch.delenv("CILKIT_CACHE", raising=False)


def noise(path: Path, seed: int, size=(16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)


def make_folder(root: Path, per_class: int = 3) -> list[Path]:
    files = []
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for i in range(per_class):
                files.append(root / split / c / f"{i:03d}.png")
                noise(files[-1], len(files))
    return files


def break_files(files: list[Path]) -> None:
    """Half of them garbage (no header), half truncated (a header, then too few bytes)."""
    for i, f in enumerate(files):
        data = f.read_bytes()
        f.write_bytes(b"this is not an image" if i % 2 else data[:len(data) // 2])


@pytest.mark.parametrize("size", [None, 8])
@pytest.mark.parametrize("pool", [False, True])
def test_every_corrupt_file_in_one_error(tmp_path, monkeypatch, size, pool):
    if pool:
        monkeypatch.setattr(imagecache, "_POOL_MIN_FILES", 1)
        monkeypatch.setattr(imagecache, "_POOL_CHUNK", 7)
        monkeypatch.setattr(imagecache.os, "cpu_count", lambda: 2)
    files = make_folder(tmp_path, per_class=12)  # 48 files
    bad = [f for i, f in enumerate(files) if i % 2 or i == 46]  # 25 bad files, in train and test
    break_files(bad)
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path, size)
    message = str(info.value)
    assert message.startswith("cannot decode 25 of 48 image files")
    named = re.findall(r"^  (/\S+): ", message, flags=re.M)
    assert len(named) == 20 and named == [str(f) for f in bad[:20]]
    assert message.rstrip().endswith("and 5 more")
    assert not (tmp_path / ".cilkit-cache" / f"imagefolder-{size or 'native'}.npz").exists()


def test_a_few_corrupt_files_are_all_named(tmp_path):
    files = make_folder(tmp_path)
    break_files([files[0], files[-1]])
    with pytest.raises(DatasetError) as info:
        load_imagefolder(tmp_path, 8)
    message = str(info.value)
    assert str(files[0]) in message and str(files[-1]) in message and "more" not in message


def test_decoding_logs_start_and_end_with_count_and_time(tmp_path, caplog):
    make_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="cilkit"):
        load_imagefolder(tmp_path, 8)
    messages = [r.getMessage() for r in caplog.records if r.name == "cilkit"]
    assert any(m.startswith("decoding 12 images to 8x8 pixels") for m in messages)
    assert any(re.fullmatch(r"decoded 12 images in \d+\.\d s", m) for m in messages)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    make_folder(tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_imagefolder(tmp_path, None)
    shown = terminal.getvalue()
    assert "reading image sizes" in shown and "decoding images" in shown
    (tmp_path / ".cilkit-cache" / "imagefolder-native.npz").unlink()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    load_imagefolder(tmp_path, None)
    assert pipe.getvalue() == ""
