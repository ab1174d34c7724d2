"""``cilkit export``: the exported TorchScript / ONNX model gives what ``cilkit predict`` gives on the same images, for
methods with their own inference (BiC's bias layers, DER's expandable network, PODNet's local similarity classifier)
and for the NME head (the class means inside the file)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cilkit
from cilkit.cli import main
from cilkit.data.readers import load_digits
from cilkit.errors import CilkitError
from cilkit.export import ExportError, export, onnx_available, run_onnx, run_torchscript

SMOKE = {"scenario": {"name": "B0-Inc5"}, "model": {"backbone": "convnet", "widths": [8, 16]},
         "train": {"epochs": 1, "batch_size": 32}, "memory": {"size": 60}, "threads": 1, "device": "cpu"}
CASES = [("replay", "cnn"), ("bic", "cnn"), ("der", "cnn"), ("podnet", "cnn"), ("icarl", "nme")]
onnx_only = pytest.mark.skipif(not onnx_available(), reason="onnx and onnxruntime not installed (the extra: pip install -e '.[export]')")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    made = {}

    def get(method: str):
        if method not in made:
            cilkit.run({**SMOKE, "method": method}, run_dir=root / method)
            made[method] = root / method
        return made[method]

    return get


@pytest.fixture(scope="module")
def images():
    return load_digits().test.images[:37]  # not a multiple of the trace's batch of 2


def assert_same_as_predict(model, scores: np.ndarray, images: np.ndarray, head: str):
    k = model.n_seen
    predicted = model.predict(images, head=head, topk=k)
    probs = torch.softmax(torch.from_numpy(scores), dim=1)
    top = probs.topk(k, dim=1)
    assert scores.shape == (len(images), len(model.classes))
    assert np.array_equal(top.indices.numpy()[:, 0], predicted.labels[:, 0])
    assert np.allclose(top.values.numpy(), predicted.probabilities, atol=1e-5)


@pytest.mark.parametrize("method,head", CASES)
def test_torchscript_export_gives_what_predict_gives(runs, images, tmp_path, method, head):
    model = cilkit.load(runs(method), device="cpu")
    written = export(model, "torchscript", tmp_path, head=head)
    assert written["model"] == tmp_path / ("model-nme.pt" if head == "nme" else "model.pt")
    assert written["max_difference"] < 1e-4
    assert_same_as_predict(model, run_torchscript(written["model"], images), images, head)
    about = json.loads((tmp_path / "classes.json").read_text())
    assert about["classes"] == model.classes and about["method"] == method and about["task"] == 2
    assert about["input"]["height"] == 8 and about["input"]["channels"] == 1 and about["input"]["layout"] == "NHWC uint8"


@onnx_only
@pytest.mark.parametrize("method,head", CASES)
def test_onnx_export_gives_what_predict_gives(runs, images, tmp_path, method, head):
    model = cilkit.load(runs(method), device="cpu")
    written = export(model, "onnx", tmp_path, head=head)
    assert written["model"] == tmp_path / ("model-nme.onnx" if head == "nme" else "model.onnx")
    import onnx

    inside = {p.key: p.value for p in onnx.load(str(written["model"])).metadata_props}
    assert json.loads(inside["classes.json"])["classes"] == model.classes
    assert json.loads(inside["classes.json"])["head"] == head
    assert_same_as_predict(model, run_onnx(written["model"], images), images, head)


def test_torchscript_file_runs_without_cilkit(runs, images, tmp_path):
    export(cilkit.load(runs("icarl"), device="cpu"), "torchscript", tmp_path, head="nme")
    np.save(tmp_path / "x.npy", images)
    code = ("import sys; sys.modules['cilkit'] = None\n"  # any import of cilkit now fails
            "import json, numpy as np, torch\n"
            "extra = {'classes.json': ''}\n"
            f"m = torch.jit.load({str(tmp_path / 'model-nme.pt')!r}, _extra_files=extra)\n"
            f"s = m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "about = json.loads(extra['classes.json'])\n"
            "print(json.dumps([s.shape[0], s.shape[1], about['classes'], about['head']]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    n, k, classes, head = json.loads(done.stdout.strip().splitlines()[-1])
    assert (n, k, head) == (len(images), 10, "nme")
    assert classes == json.loads((tmp_path / "classes.json").read_text())["classes"]


def test_cli_export_into_the_run_folder_and_refusals(runs, tmp_path, capsys, monkeypatch):
    run = runs("replay")
    assert main(["export", str(run), "--head", "nme", "--threads", "1"]) == 0
    assert "checked against cilkit" in capsys.readouterr().out
    assert (run / "export" / "model-nme.pt").is_file() and (run / "export" / "classes.json").is_file()
    lwf = tmp_path / "lwf"
    cilkit.run({**{k: v for k, v in SMOKE.items() if k != "memory"}, "method": "lwf"}, run_dir=lwf)
    assert main(["export", str(lwf), "--head", "nme", "--out", str(tmp_path / "out")]) == 2
    assert "keeps no exemplars" in capsys.readouterr().err and not (tmp_path / "out").exists()
    monkeypatch.setattr("cilkit.export.onnx_available", lambda: False)
    assert main(["export", str(lwf), "--format", "onnx", "--out", str(tmp_path / "out")]) == 2
    assert "pip install" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_inference_a_trace_cannot_record_is_refused_not_written(runs, tmp_path):
    model = cilkit.load(runs("replay"), device="cpu")
    net = model.method.net
    # the batch size read as a Python number: a trace fixes it to the example's
    model.method.inference = lambda x: {"logits": net(x)["logits"].reshape(len(x), -1), "features": None}
    with pytest.raises(ExportError, match="batch size"):
        export(model, "torchscript", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CilkitError, match="format"):
        export(model, "tflite", tmp_path / "out")
