"""A run as a model: class names from every reader into the run folder, cilkit.load, predict (API and CLI), and
what is refused (missing, corrupt or ill-shaped images; folders that are not runs; a checkpoint holding code)."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_readers as gen  # the readers' tiny generated data (imported as a module: its tests are not collected twice)
import torch
from PIL import Image

import cilkit
from cilkit.cli import main
from cilkit.data.imagecache import fit_image, resize_center_crop
from cilkit.data.readers import FASHION_MNIST_CLASSES, load_digits
from cilkit.errors import CilkitError
from cilkit.trained import InputError

# A small digits run: two tasks of five digits, a convnet, a memory (so both heads exist).
DIGITS = {"method": "replay", "scenario": {"name": "B0-Inc5"}, "model": {"backbone": "convnet", "widths": [8, 16]},
          "train": {"epochs": 3, "batch_size": 32}, "memory": {"size": 60}, "threads": 1, "device": "cpu"}
TINY_RUN = {"method": "finetune", "scenario": {"name": "B0-Inc2"}, "model": {"backbone": "mlp", "hidden": [16]},
            "train": {"epochs": 1, "first_epochs": 1, "lr": 0.01, "schedule": "constant", "milestones": [],
                      "first_milestones": None, "batch_size": 8, "augment": "none"}, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("trained") / "digits"
    metrics = cilkit.run(DIGITS, run_dir=path)
    return path, metrics


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def accuracy(names: list[str], labels: np.ndarray) -> float:
    """Top-1 in % of predicted names against the digits' own labels (a digit's class name is the digit)."""
    return 100.0 * float(np.mean([n == str(int(y)) for n, y in zip(names, labels)]))


# -- predict agrees with the run's own evaluation --------------------------------------------------------------------


def test_predict_matches_the_runs_evaluation_on_its_test_images(digits_run, digits):
    path, metrics = digits_run
    model = cilkit.load(path, device="cpu")
    assert model.classes == metrics["class_names"] and model.heads == ("cnn", "nme") and model.task == 1
    for head in ("cnn", "nme"):
        p = model.predict(digits.test.images, head=head, topk=3)
        assert p.labels.shape == (len(digits.test.images), 3)
        assert np.all(np.diff(p.probabilities, axis=1) <= 0)  # best first
        assert accuracy(p.top1, digits.test.labels) == pytest.approx(metrics["tasks"][-1][head]["top1"], abs=1e-4)


def test_predict_after_the_first_task_matches_its_evaluation(digits_run, digits):
    path, metrics = digits_run
    model = cilkit.load(path, task=1, device="cpu")
    first = metrics["class_names"][:5]
    assert model.classes == first and model.task == 0
    keep = np.isin(digits.test.labels, [int(c) for c in first])
    p = model.predict(digits.test.images[keep], head="cnn")
    assert set(p.top1) <= set(first) and p.labels.shape[1] == 5
    assert accuracy(p.top1, digits.test.labels[keep]) == pytest.approx(metrics["tasks"][0]["cnn"]["top1"], abs=1e-4)


def test_load_leaves_the_callers_random_generators_alone(digits_run):
    torch.manual_seed(123)
    np.random.seed(7)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(7)
    cilkit.load(digits_run[0], device="cpu")
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_np)


def test_cli_predict_files_folders_and_npz(digits_run, digits, tmp_path, capsys):
    path, _ = digits_run
    images = digits.test.images[:30]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images[:20]):
        Image.fromarray(im[..., 0]).save(folder / ("sub" if i % 2 else "") / f"{i:02d}.png")
    np.savez(tmp_path / "more.npz", x=images[20:])
    api = cilkit.load(path, device="cpu").predict(images, topk=2)
    out = tmp_path / "p.csv"
    code = main(["predict", str(path), str(folder), str(tmp_path / "more.npz"), "--topk", "2", "--out", str(out),
                 "--device", "cpu", "--threads", "1", "--batch-size", "7"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "class1" in printed and f"predictions: {out} (30 images)" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["source"] for r in rows[:2]] == [str(folder / "00.png"), str(folder / "02.png")]  # sorted, recursive
    assert rows[-1]["source"] == f"{tmp_path / 'more.npz'}[9]"
    by_source = {r["source"]: r for r in rows}
    files = {str(folder / ("sub" if i % 2 else "") / f"{i:02d}.png"): i for i in range(20)}
    for source, i in [*files.items(), *((f"{tmp_path / 'more.npz'}[{j}]", 20 + j) for j in range(10))]:
        row = by_source[source]
        assert [row["class1"], row["class2"]] == api.names[i]
        assert float(row["p1"]) == pytest.approx(float(api.probabilities[i, 0]), abs=1e-5)
    assert main(["predict", str(path), str(folder / "00.png"), "--head", "nme", "--out", str(tmp_path / "p.json"),
                 "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["head"] == "nme" and saved["method"] == "replay" and saved["task"] == 2
    assert len(saved["images"][0]["predictions"]) == 5 and saved["classes"] == api.classes


# -- class names from every reader into metrics.json and the loaded model ---------------------------------------------


def _idx(root: Path, name: str) -> dict:
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    for split, n in (("train", 20), ("t10k", 10)):
        gen.write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 5, 4)), gz=False)
        gen.write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    return {"dataset": name, "root": str(root), "n_classes": 4}


def _cifar(root: Path, name: str) -> dict:
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    k, key = (10, "labels") if ten else (100, "fine_labels")
    names = [f"{'c' if ten else 'f'}{i}".encode() for i in range(k)]
    parts = [(f"data_batch_{i}", 4) for i in range(1, 6)] if ten else [("train", 2 * k)]
    offset = 0
    for part, n in [*parts, ("test_batch" if ten else "test", k)]:  # every class in train and in test
        gen.dump(folder / part, {"data": gen.chw_rows(n, offset), key: list((offset + np.arange(n)) % k)}, byte_keys=True)
        offset += n
    gen.dump(folder / ("batches.meta" if ten else "meta"), {"label_names" if ten else "fine_label_names": names},
             byte_keys=True)
    return {"dataset": name, "root": str(root), "n_classes": 4}


def _tiny(root: Path, name: str) -> dict:
    gen.make_tiny(root / "tiny-imagenet-200")
    return {"dataset": "tinyimagenet", "root": str(root), "cache_dir": str(root / "cache")}


def _folder(root: Path, name: str) -> dict:
    for split in ("train", "test"):
        for cls, colour in (("zebra", gen.RED), ("apple", gen.GREEN), ("moth", gen.BLUE)):
            for i in range(2):
                gen.solid(root / split / cls / f"{i}.png", colour, size=(6, 6))
    return {"dataset": "imagefolder", "root": str(root), "cache_dir": str(root / "cache")}


def _numpy(root: Path, name: str) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    path = root / "toy.npz"
    np.savez(path, x_train=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8), y_train=np.arange(12) % 3,
             x_test=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), y_test=np.arange(6) % 3,
             class_names=np.array(["ant", "bee", "cow"]))
    return {"dataset": "numpy", "root": str(path)}


READERS = {
    "digits": (lambda root, name: {"dataset": "digits", "n_classes": 4}, [str(i) for i in range(10)]),
    "mnist": (_idx, [str(i) for i in range(10)]),
    "fashion-mnist": (_idx, FASHION_MNIST_CLASSES),
    "cifar10": (_cifar, [f"c{i}" for i in range(10)]),
    "cifar100": (_cifar, [f"f{i}" for i in range(100)]),
    "tinyimagenet": (_tiny, ["goldfish", "n02", "tabby"]),  # words.txt's first synonym, else the wnid
    "imagefolder": (_folder, ["apple", "moth", "zebra"]),  # the folders, sorted
    "numpy": (_numpy, ["ant", "bee", "cow"]),  # the .npz's class_names
}


@pytest.mark.parametrize("name", list(READERS))
def test_class_names_travel_from_every_reader_to_the_model(tmp_path, name):
    make, names = READERS[name]
    data = make(tmp_path / "data", name)
    metrics = cilkit.run({**TINY_RUN, "data": data}, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = [names[c] for c in saved["class_order"]]
    assert saved["class_names"] == expected == metrics["class_names"]
    model = cilkit.load(tmp_path / "run", device="cpu")
    assert model.classes == expected[: saved["tasks"][-1]["n_seen"]]
    shutil.rmtree(tmp_path / "data", ignore_errors=True)  # the model needs no data: only the run folder
    model = cilkit.load(tmp_path / "run", device="cpu")
    c, h, w = saved["image_shape"]
    p = model.predict(np.zeros((2, h, w, c), np.uint8), topk=2)
    assert set(p.top1) <= set(model.classes) and p.labels.shape == (2, 2)
    if name == "numpy":  # a method without a memory has no NME head
        assert model.heads == ("cnn",)
        with pytest.raises(CilkitError, match="keeps no exemplars"):
            model.predict(np.zeros((1, h, w, c), np.uint8), head="nme")


def test_resized_image_folder_predicts_files_through_the_runs_resize(tmp_path):
    for split in ("train", "test"):
        for cls, colour in (("red", gen.RED), ("blue", gen.BLUE)):
            for i in range(3):
                gen.solid(tmp_path / "data" / split / cls / f"{i}.png", colour, size=(9 + i, 7))
    cilkit.run({**TINY_RUN, "data": {"dataset": "imagefolder", "root": str(tmp_path / "data"), "image_size": 4,
                                     "cache_dir": str(tmp_path / "cache")}}, run_dir=tmp_path / "run")
    model = cilkit.load(tmp_path / "run", device="cpu")
    wide = Image.new("RGB", (16, 8), gen.RED)
    wide.paste(gen.BLUE, (8, 0, 16, 8))
    wide.save(tmp_path / "wide.png")
    by_file = model.predict(tmp_path / "wide.png", topk=2)
    by_array = model.predict(np.asarray(resize_center_crop(wide, 4))[None], topk=2)
    assert by_file.labels.tolist() == by_array.labels.tolist()
    assert np.allclose(by_file.probabilities, by_array.probabilities)
    by_big_array = model.predict(np.asarray(wide)[None], topk=2)  # arrays of another size are resized alike
    assert np.allclose(by_big_array.probabilities, by_array.probabilities)


# -- bad input: one message, exit code 2, nothing written -------------------------------------------------------------


def _refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cilkit: error: ") and all(n in err for n in needles), err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


def test_predict_refuses_bad_images(digits_run, tmp_path, capsys):
    run = str(digits_run[0])
    out = tmp_path / "p.csv"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    _refused(capsys, ["predict", run, str(good), str(tmp_path / "missing.png")], out, "no such file", "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    _refused(capsys, ["predict", run, str(good), str(tmp_path / "corrupt.png")], out, "corrupt.png", "cannot be decoded")
    Image.new("RGB", (8, 8), gen.RED).save(tmp_path / "colour.png")
    Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "grey-as-rgb.png")  # grey in an RGB file: taken as grey
    assert cilkit.load(run, device="cpu").predict(tmp_path / "grey-as-rgb.png").labels.tolist() == \
        cilkit.load(run, device="cpu").predict(np.full((1, 8, 8), 90, np.uint8)).labels.tolist()
    _refused(capsys, ["predict", run, str(tmp_path / "colour.png")], out, "colour.png", "colour image",
             "8x8 grayscale (1 channel)")
    big = np.zeros((16, 16), np.uint8)
    big[4:12, 4:12] = 255
    Image.fromarray(big).save(tmp_path / "big.png")  # another size: fitted to 8x8 as extend fits what it adds
    fitted = np.asarray(fit_image(Image.fromarray(big), 8, 8))
    assert fitted.shape == (8, 8) and fitted[3:5, 3:5].min() == 255 and fitted[0, 0] == 0
    assert cilkit.load(run, device="cpu").predict(tmp_path / "big.png").labels.tolist() == \
        cilkit.load(run, device="cpu").predict(fitted[None]).labels.tolist()
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["predict", run, str(tmp_path / "empty")], out, "without image files")
    np.savez(tmp_path / "rgb.npz", x=np.zeros((2, 8, 8, 3), np.uint8))
    _refused(capsys, ["predict", run, str(tmp_path / "rgb.npz")], out, "3 channel(s)")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    _refused(capsys, ["predict", run, str(tmp_path / "broken.npz")], out, "broken.npz", "cannot read")
    assert main(["predict", run, str(good), "--out", str(tmp_path / "p.txt")]) == 2
    assert "give a .csv or .json file" in capsys.readouterr().err
    model = cilkit.load(run, device="cpu")
    for bad in (np.zeros((2, 8, 8), np.float32), np.zeros((8, 8, 1, 1, 1), np.uint8), np.zeros((2, 8, 8, 2), np.uint8)):
        with pytest.raises(InputError):
            model.predict(bad)
    with pytest.raises(CilkitError, match="topk"):
        model.predict(np.zeros((1, 8, 8), np.uint8), topk=0)


class _RunsCode:
    """Unpickling this runs ``Path(marker).touch()``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_predict_and_load_refuse_folders_that_are_not_finished_runs(digits_run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    out = tmp_path / "p.csv"
    _refused(capsys, ["predict", str(tmp_path / "nowhere"), str(good)], out, "does not exist")
    (tmp_path / "plain").mkdir()
    _refused(capsys, ["predict", str(tmp_path / "plain"), str(good)], out, "not a cilkit run folder")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(digits_run[0] / "config.yaml", unfinished / "config.yaml")
    _refused(capsys, ["predict", str(unfinished), str(good)], out, "no finished task")
    _refused(capsys, ["predict", str(digits_run[0]), str(good), "--task", "3"], out, "no checkpoint of task 3")
    assert main(["export", str(unfinished)]) == 2 and "no finished task" in capsys.readouterr().err
    assert not (unfinished / "export").exists()

    hostile = tmp_path / "hostile"
    shutil.copytree(digits_run[0], hostile)
    marker = tmp_path / "code-ran"
    state = torch.load(hostile / "checkpoints" / "task_001.pt", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, hostile / "checkpoints" / "task_001.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    _refused(capsys, ["predict", str(hostile), str(good)], out, "not data", "refused")
    assert main(["export", str(hostile)]) == 2 and "not data" in capsys.readouterr().err
    assert not marker.exists() and not (hostile / "export").exists()
    with pytest.raises(CilkitError, match="not data"):
        cilkit.load(hostile)
    assert not marker.exists()


def test_extend_from_a_loaded_model_returns_the_grown_model(digits_run, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for cls, level in (("bright", 230), ("dark", 20)):
            (tmp_path / "new" / split / cls).mkdir(parents=True)
            for i in range(n):
                image = np.clip(rng.normal(level, 10, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(tmp_path / "new" / split / cls / f"{i}.png")
    model = cilkit.load(digits_run[0], device="cpu")
    with pytest.raises(CilkitError, match="last finished task"):
        cilkit.load(digits_run[0], task=1, device="cpu").extend(tmp_path / "new")
    grown = model.extend(tmp_path / "new", run_dir=tmp_path / "grown", threads=1)
    assert grown.run.path == tmp_path / "grown" and grown.task == model.task + 1
    assert grown.classes == [*model.classes, "bright", "dark"] and len(grown.metrics["tasks"]) == 3
    assert set(grown.predict(tmp_path / "new" / "test").top1) <= set(grown.classes)
    assert cilkit.load(digits_run[0], device="cpu").classes == model.classes  # the parent run is left as it was
