"""Downloading and unpacking CIFAR from a local HTTP server: checksums and path safety."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cilkit.data import readers
from cilkit.data.download import download_url, extract_archive
from cilkit.data.readers import load_cifar
from cilkit.errors import DatasetError


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging every request to stderr."""

    def log_message(self, format, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one regular file member to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_cifar10(archive: Path, extra_member: str | None = None) -> str:
    """A tiny cifar-10-batches-py tar.gz (pixel value = image index); returns its md5."""
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
            batch = {"data": np.full((1, 3072), i, np.uint8), "labels": [i % 10]}
            add_bytes(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch))
        add_bytes(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({"label_names": [str(i) for i in range(10)]}))
        if extra_member:
            add_bytes(tar, extra_member, b"gotcha")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def point_cifar10_at(monkeypatch, url: str, md5: str) -> None:
    monkeypatch.setitem(readers.CIFAR_ARCHIVES, "cifar10", {"url": url, "md5": md5})


def test_download_and_load_cifar10(tmp_path, served, monkeypatch):
    folder, base = served
    md5 = fake_cifar10(folder / "cifar-10-python.tar.gz")
    point_cifar10_at(monkeypatch, f"{base}/cifar-10-python.tar.gz", md5)
    root = tmp_path / "data"
    d = load_cifar(root, "cifar10", download=True)
    assert d.train.images.shape == (5, 32, 32, 3) and d.test.images.shape == (1, 32, 32, 3)
    assert d.train.images[4].min() == d.train.images[4].max() == 4 and d.test.labels.tolist() == [5]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # archive removed
    assert len(load_cifar(root, "cifar10", download=True).train) == 5  # present now: no second download


def test_wrong_md5_leaves_nothing(tmp_path, served, monkeypatch):
    folder, base = served
    fake_cifar10(folder / "cifar-10-python.tar.gz")
    point_cifar10_at(monkeypatch, f"{base}/cifar-10-python.tar.gz", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="md5") as info:
        load_cifar(root, "cifar10", download=True)
    assert f"{base}/cifar-10-python.tar.gz" in str(info.value) and "0" * 32 in str(info.value)
    assert list(root.iterdir()) == []


def test_unsafe_member_rejected(tmp_path, served, monkeypatch):
    folder, base = served
    md5 = fake_cifar10(folder / "cifar-10-python.tar.gz", extra_member="../evil")
    point_cifar10_at(monkeypatch, f"{base}/cifar-10-python.tar.gz", md5)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="unsafe path '../evil'"):
        load_cifar(root, "cifar10", download=True)
    assert not (tmp_path / "evil").exists() and not (root / "cifar-10-batches-py").exists()


def test_missing_url_is_a_dataset_error(tmp_path, served):
    _, base = served
    with pytest.raises(DatasetError, match="404"):
        download_url(f"{base}/absent.tar.gz", tmp_path / "out" / "absent.tar.gz")
    assert list((tmp_path / "out").iterdir()) == []


def test_zip_with_absolute_member_rejected(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("/etc/evil", "bad")
    with pytest.raises(DatasetError, match="unsafe"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()
    with pytest.raises(DatasetError, match=r"\.tar\.gz, \.tgz, \.tar or \.zip"):
        extract_archive(tmp_path / "a.rar", tmp_path / "out")
