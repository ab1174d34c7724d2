"""cilkit extend (new classes from a folder of images as the next task of a finished run), model.init (a
state_dict trained elsewhere as the start), and the stream API (tasks given in Python)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cilkit
from cilkit.cli import main
from cilkit.data.readers import load_digits
from cilkit.errors import CilkitError, ConfigError, DatasetError
from cilkit.experiment import Experiment, build_driver, build_scenario
from cilkit.extend import extend_run
from cilkit.methods import METHODS
from tiny import SMALL_CONVNET, SMOKE_ARGS

# digits in the run: the first six of the seed-1993 order, 4 2 7 6 0 3; 8, 9, 5 and 1 are new to it
BASE = {"method": "replay", "data": {"n_classes": 6}, "model": {"backbone": "mlp", "hidden": [64]},
        "train": {"epochs": 2}, "memory": {"size": 60}, "device": "cpu", "threads": 1}


def digit_images(digit: int) -> np.ndarray:
    ds = load_digits()
    x = np.concatenate([ds.train.images, ds.test.images])[..., 0]
    y = np.concatenate([ds.train.labels, ds.test.labels])
    return x[y == digit]


def write_folder(root: Path, digits, *, split: bool = True, colour: bool = False, size: int = 8, n: int = 60) -> Path:
    """8x8 greyscale PNGs of ``digits`` (train/<d>/ and test/<d>/, or a plain <d>/ tree); ``colour``: RGB with a
    red tint, ``size``: resized."""
    for d in digits:
        for i, im in enumerate(digit_images(d)[:n]):
            folder = root / (("test" if i % 5 == 0 else "train") if split else "") / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(im, mode="L")
            if colour:
                image = Image.merge("RGB", (image, image.point(lambda v: v // 2), image.point(lambda v: v // 3)))
            if size != 8:
                image = image.resize((size, size))
            image.save(folder / f"{i:03d}.png")
    return root


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished digits run of three tasks of two classes."""
    root = tmp_path_factory.mktemp("extend")
    cilkit.run(BASE, run_dir=root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def extended(base, tmp_path_factory) -> tuple[Path, dict]:
    new = write_folder(tmp_path_factory.mktemp("new") / "digits-89", (8, 9))
    before = tree_digest(base)
    metrics = extend_run(base, new, base.parent / "ext")
    assert tree_digest(base) == before  # the parent is left as it is
    return base.parent / "ext", metrics


def test_extend_adds_the_new_classes_as_the_next_task(base, extended):
    out, metrics = extended
    parent = json.loads((base / "metrics.json").read_text())
    written = json.loads((out / "metrics.json").read_text())
    assert metrics["run_dir"] == str(out) and written["complete"] and len(written["tasks"]) == 4
    assert written["increments"] == [2, 2, 2, 2]
    assert written["class_names"][:6] == parent["class_names"] and written["class_names"][6:] == ["8", "9"]
    # the old tasks' records are the parent's; the matrix gains the new row, with every old task measured on its test set
    assert written["tasks"][:3] == parent["tasks"]
    assert written["accuracy_matrix"][:3] == parent["accuracy_matrix"]
    row = written["accuracy_matrix"][3]
    assert len(row) == 4 and all(0 <= a <= 100 for a in row)
    last = written["tasks"][3]
    assert last["classes"] == [6, 8] and last["cnn"]["old"] is not None and last["cnn"]["new"] > 80
    assert written["lineage"] == [str(base.resolve())]
    cfg = cilkit.resolve([yaml.safe_load((out / "config.yaml").read_text())])
    assert cfg.lineage == [str(base.resolve())] and len(cfg.data.new_classes) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_002.pt", "task_003.pt"]


def test_extend_equals_the_grown_config_trained_from_scratch(extended, tmp_path):
    """The extension continues the run exactly: its config, trained from scratch (every task), gives the same figures."""
    out, metrics = extended
    raw = yaml.safe_load((out / "config.yaml").read_text())
    scratch = cilkit.run({**raw, "lineage": []}, run_dir=tmp_path / "scratch")
    assert [t["cnn"] for t in scratch["tasks"]] == [t["cnn"] for t in metrics["tasks"]]


def test_extend_repeats_on_its_result_and_resumes(extended, tmp_path):
    out, _ = extended
    plain = write_folder(tmp_path / "plain", (5, 1), split=False, size=16)  # a plain tree of larger images
    metrics = extend_run(out, plain, tmp_path / "ext2")
    assert metrics["increments"] == [2, 2, 2, 2, 2] and metrics["class_names"][-2:] == ["1", "5"]
    assert metrics["lineage"] == [str(Path(metrics["lineage"][0])), str(out.resolve())]
    assert len(metrics["accuracy_matrix"]) == 5
    assert metrics["tasks"][:4] == json.loads((out / "metrics.json").read_text())["tasks"]
    # killed during the new task: the folder holds the parent's checkpoint, and resuming gives the same run
    run = tmp_path / "ext2"
    (run / "checkpoints" / "task_004.pt").unlink()
    (run / "metrics.json").unlink()
    again = Experiment.resume(run, progress="off").execute()
    for a, b in zip(again["tasks"], metrics["tasks"]):
        assert a["cnn"] == b["cnn"]


def _refused(argv, capsys, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_bad_new_data_is_refused_before_anything_is_written(base, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["extend", str(base), "--run-dir", str(out), "--progress", "off", "--data"]
    _refused(argv + [str(write_folder(tmp_path / "clash", (8, 4)))], capsys, "'4'", "already exist")
    (tmp_path / "empty").mkdir()
    _refused(argv + [str(tmp_path / "empty")], capsys, "no class folders")
    hollow = write_folder(tmp_path / "hollow", (8,))
    (hollow / "train" / "9").mkdir()
    (hollow / "test" / "9").mkdir()
    _refused(argv + [str(hollow)], capsys, "without images")
    _refused(argv + [str(write_folder(tmp_path / "colour", (8, 9), colour=True))], capsys, "greyscale", "in colour")
    broken = write_folder(tmp_path / "broken", (8, 9))
    (broken / "train" / "8" / "000.png").write_bytes(b"not a png")
    _refused(argv + [str(broken)], capsys, "cannot decode 1 of", "000.png")
    _refused(argv + [str(tmp_path / "missing")], capsys, "do not exist")
    assert not out.exists()
    # arrays given in Python must already have the run's shape
    with pytest.raises(DatasetError, match="model takes 8x8 with 1"):
        extend_run(base, {"x": np.zeros((10, 28, 28), np.uint8), "y": np.arange(10) % 2}, out)
    with pytest.raises(CilkitError, match="only device, threads"):
        extend_run(base, tmp_path / "clash", out, epochs=3)
    assert not out.exists()


def test_a_run_that_is_not_finished_or_not_a_run_is_refused(base, tmp_path, capsys):
    new = write_folder(tmp_path / "new", (8, 9))
    argv = ["extend", "--data", str(new), "--run-dir", str(tmp_path / "out")]
    (tmp_path / "plain").mkdir()
    _refused([*argv, str(tmp_path / "plain")], capsys, "not a cilkit run folder")
    _refused([*argv, str(tmp_path / "nowhere")], capsys, "no such folder")
    cut = tmp_path / "cut"
    shutil.copytree(base, cut)
    m = json.loads((cut / "metrics.json").read_text())
    m.update(complete=False, tasks=m["tasks"][:2])
    (cut / "metrics.json").write_text(json.dumps(m))
    (cut / "checkpoints" / "task_002.pt").unlink()
    _refused([*argv, str(cut)], capsys, "not finished (2 of 3 tasks)", "--resume")
    (cut / "metrics.json").unlink()
    _refused([*argv, str(cut)], capsys, "no metrics.json")
    evil = tmp_path / "evil"  # a finished run whose last checkpoint was replaced by one that runs code on load
    shutil.copytree(base, evil)

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"next_task": 3, "net": Code()}, evil / "checkpoints" / "task_002.pt")
    _refused([*argv, str(evil)], capsys, "not data", "refused")
    _refused(["extend", str(base), "--data", str(new), "--run-dir", str(base)], capsys, "is the parent run")
    assert not (tmp_path / "out").exists()


def test_a_fixed_head_cannot_grow(tmp_path, capsys):
    run = tmp_path / "fixed"
    cilkit.run({**BASE, "data": {"n_classes": 4}, "model": {**BASE["model"], "head": "fixed"}, "train": {"epochs": 1}},
               run_dir=run)
    err = _refused(["extend", str(run), "--data", str(write_folder(tmp_path / "new", (8, 9))), "--run-dir",
                    str(tmp_path / "out")], capsys, "model.head", "no room")
    assert "4 classes" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lwf", "der", "bic"])
def test_extend_works_for_methods_that_grow_structure(method, tmp_path):
    """Distillation with a teacher (LwF), an extractor per task (DER), bias layers per task (BiC)."""
    layer = {**BASE, "method": method, "data": {"n_classes": 4}, "train": {"epochs": 1}}
    if METHODS[method].memory_use == "none":
        layer.pop("memory")
    cilkit.run(layer, run_dir=tmp_path / "run")
    metrics = extend_run(tmp_path / "run", write_folder(tmp_path / "new", (8, 9), n=30), tmp_path / "ext")
    assert metrics["complete"] and metrics["increments"] == [2, 2, 2] and len(metrics["accuracy_matrix"][2]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_extend_every_method(method, tmp_path):
    """Every method extends a two-task run by a third task, except through a fixed head, which says it cannot grow."""
    layer = {**BASE, "method": method, "method_args": SMOKE_ARGS.get(method, {}), "data": {"n_classes": 4},
             "model": SMALL_CONVNET, "train": {"epochs": 1}}
    if METHODS[method].memory_use == "none":
        layer.pop("memory")
    cilkit.run(layer, run_dir=tmp_path / "run")
    fixed = cilkit.resolve([layer]).model.head == "fixed"
    try:
        metrics = extend_run(tmp_path / "run", write_folder(tmp_path / "new", (8, 9), n=30), tmp_path / "ext")
    except CilkitError as e:
        assert fixed and "cannot grow" in str(e) and not (tmp_path / "ext").exists(), e
        return
    assert not fixed
    assert metrics["complete"] and metrics["increments"][-1] == 2
    assert len(metrics["accuracy_matrix"]) == len(metrics["increments"])


# -- model.init ------------------------------------------------------------------------------------------------


def _net_state(base: Path, task: int = 0) -> dict:
    return torch.load(base / "checkpoints" / f"task_{task:03d}.pt", weights_only=True)["net"]


def test_model_init_with_the_head_keeps_the_first_task(base, tmp_path):
    torch.save(_net_state(base), tmp_path / "net.pt")
    parent = json.loads((base / "metrics.json").read_text())
    layer = {**BASE, "model": {**BASE["model"], "init": str(tmp_path / "net.pt"), "init_first": "keep"}}
    metrics = cilkit.run(layer, run_dir=tmp_path / "keep")
    first = metrics["tasks"][0]
    assert first["train_images"] == 0  # not trained: the file's classifier is the first task
    assert first["cnn"]["top1"] == parent["tasks"][0]["cnn"]["top1"] > 90
    assert metrics["init"] == {"path": str((tmp_path / "net.pt").resolve()), "first_task": "keep", "head_rows": 2}
    assert len(metrics["tasks"]) == 3


def test_model_init_loads_the_backbone_in_every_key_form(base, tmp_path):
    net = _net_state(base)
    backbone = {k[len("backbone."):]: v for k, v in net.items() if k.startswith("backbone.")}
    forms = {"backbone": backbone, "wrapped": {"state_dict": {f"module.{k}": v for k, v in backbone.items()}},
             "with-fc": {**backbone, "fc.weight": torch.zeros(2, 64), "fc.bias": torch.zeros(2)}}
    x = torch.rand(5, 1, 8, 8)
    scenario = build_scenario(cilkit.resolve([BASE]))
    for name, state in forms.items():
        torch.save(state, tmp_path / f"{name}.pt")
        cfg = cilkit.resolve([{**BASE, "model": {**BASE["model"], "init": str(tmp_path / f"{name}.pt")}}])
        driver = build_driver(cfg, scenario, progress="off")
        got = driver.net.backbone.eval()(x)["features"]
        ref = build_driver(cilkit.resolve([BASE]), scenario, progress="off").net.backbone
        ref.load_state_dict(backbone)
        assert torch.equal(got, ref.eval()(x)["features"]), name


def test_model_init_that_does_not_fit_is_refused_naming_it(base, tmp_path, capsys):
    torch.save(_net_state(base), tmp_path / "mlp.pt")
    argv = ["run", "--set", "data.n_classes=6", "--epochs", "1", "--device", "cpu", "--run-dir", str(tmp_path / "out")]
    _refused([*argv, "--set", f"model.init={tmp_path / 'mlp.pt'}"], capsys, "model.init", "does not fit", "missing")
    _refused([*argv, "--set", f"model.init={tmp_path / 'none.pt'}"], capsys, "model.init", "path of an existing file")

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    _refused([*argv, "--set", f"model.init={tmp_path / 'evil.pt'}"], capsys, "model.init", "not tensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 20)
    _refused([*argv, "--set", f"model.init={tmp_path / 'junk.pt'}"], capsys, "model.init", "cannot be read")
    torch.save({k[len("backbone."):]: v for k, v in _net_state(base).items() if k.startswith("backbone.")}, tmp_path / "bb.pt")
    _refused([*argv, "--set", "model.backbone=mlp", "--set", "model.hidden=[64]", "--set", f"model.init={tmp_path / 'bb.pt'}",
              "--set", "model.init_first=keep"], capsys, "model.init_first", "no linear classifier")
    assert not (tmp_path / "out").exists()


# -- tasks given in Python --------------------------------------------------------------------------------------


class DigitsDataset(torch.utils.data.Dataset):
    """(float CHW image in [0, 1], label) items, as a torchvision pipeline gives them."""

    def __init__(self, digits):
        self.x = np.concatenate([digit_images(d) for d in digits])
        self.y = np.concatenate([[d] * len(digit_images(d)) for d in digits])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]).float()[None] / 255.0, int(self.y[i])


def test_stream_of_arrays_and_a_dataset(tmp_path):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    x = np.concatenate([digit_images(d) for d in (7, 3)])
    y = np.concatenate([[d] * len(digit_images(d)) for d in (7, 3)])
    test = {"x": x[::4], "y": y[::4], "class_names": names}
    tasks = [{"train": {"x": x, "y": y, "class_names": names}, "test": test}, DigitsDataset((1, 5))]
    layer = {"method": "replay", "model": {"backbone": "mlp", "hidden": [64]},
             "train": {"epochs": 2, "lr": 0.05, "batch_size": 32},
             "memory": {"size": 40}, "device": "cpu", "threads": 1}
    metrics = cilkit.run(layer, run_dir=tmp_path / "stream", stream=tasks)
    # the scenario follows the given tasks: their classes in the order given, the first task's names from class_names
    assert metrics["dataset"] == "stream" and metrics["increments"] == [2, 2]
    assert metrics["class_names"] == ["three", "seven", "1", "5"]
    assert metrics["tasks"][0]["cnn"]["top1"] > 90 and len(metrics["accuracy_matrix"][1]) == 2
    n_test = len(test["y"]) + round(0.2 * len(digit_images(1))) + round(0.2 * len(digit_images(5)))
    exp = Experiment.resume(tmp_path / "stream", progress="off", stream=tasks)
    assert len(exp.runtime.test_data) == n_test
    with pytest.raises(DatasetError, match="given in Python"):
        Experiment.resume(tmp_path / "stream", progress="off")


def test_bad_streams_are_refused():
    x = digit_images(0)
    ok = {"x": x, "y": np.zeros(len(x), int)}
    for stream, match in [([], "non-empty list"), ([{"x": x}], "keys x, y"), ([ok, ok], "already exist"),
                          ([{"x": x[:, :4], "y": np.zeros(len(x), int)}, {"x": x, "y": np.ones(len(x), int)}], "model takes"),
                          ([{"x": x * 1.5, "y": np.zeros(len(x))}], "float in"), ([{"x": x[:1], "y": [0]}], "at least 2")]:
        with pytest.raises(DatasetError, match=match):
            cilkit.run({"device": "cpu"}, stream=stream)


def test_a_config_error_names_data_new_classes(tmp_path):
    with pytest.raises(ConfigError, match=r"data.new_classes\[0\]"):
        cilkit.resolve([{"data": {"new_classes": [str(tmp_path / "absent")]}}])


def test_the_practitioners_example_runs(tmp_path, monkeypatch, capsys):
    """docs/practitioners.md's Python block, executed as written (in a scratch folder)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "practitioners.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "docs/practitioners.md", "exec"), scope)  # noqa: S102 - the documentation's own example
    grown, eights, again = scope["grown"], scope["eights"], scope["again"]
    assert grown["increments"] == [2, 2, 2, 2] and grown["class_names"][-2:] == ["8", "9"]
    assert len(grown["accuracy_matrix"]) == 4 and grown["lineage"] == [str((tmp_path / "runs" / "digits").resolve())]
    assert eights.top1.count("8") >= 0.8 * len(eights)
    first = json.loads((tmp_path / "runs" / "digits" / "metrics.json").read_text())["tasks"][0]["cnn"]["top1"]
    assert again["tasks"][0]["cnn"]["top1"] == first and again["tasks"][0]["train_images"] == 0
    assert scope["streamed"]["class_names"] == ["zero", "one", "two", "three"]
