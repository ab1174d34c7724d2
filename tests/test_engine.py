import json

import pytest
import torch
import yaml

from cilkit import Experiment, resolve
from cilkit.cli import main
from cilkit.methods import METHODS

FAST = {"train": {"epochs": 2, "batch_size": 64}, "model": {"backbone": "mlp", "hidden": [64]}, "memory": {"size": 60}}


def _cfg(**over):
    layer = json.loads(json.dumps(FAST))
    for k, v in over.items():
        layer[k] = {**layer.get(k, {}), **v} if isinstance(v, dict) else v
    if METHODS[layer.get("method", "replay")].memory_use == "none":
        layer.pop("memory")  # a budget given to an exemplar-free method is refused
    return resolve([layer])


def _figures(metrics):
    """Everything in metrics.json except timings."""
    drop = {"wall_time_s", "train_seconds", "train_images_per_s", "phase_seconds"}
    tasks = [{k: v for k, v in t.items() if k not in drop} for t in metrics["tasks"]]
    summary = {k: v for k, v in metrics["summary"].items() if k not in {"wall_time_s", "train_images_per_s"}}
    return tasks, summary


def test_run_folder_contents(tmp_path):
    exp = Experiment(_cfg(method="replay"), tmp_path / "run", progress="off")
    metrics = exp.execute()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "metrics.csv", "log.txt", "accuracy.png"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"task_{i:03d}.pt" for i in range(5)]
    saved = json.loads((run / "metrics.json").read_text())
    s = saved["summary"]
    for key in ("avg_incremental_accuracy", "last_accuracy", "avg_forgetting", "bwt", "nme_avg_incremental_accuracy", "nme_last_accuracy"):
        assert key in s
    assert len(saved["tasks"]) == 5 and saved["complete"]
    assert s["avg_incremental_accuracy"] == pytest.approx(sum(t["cnn"]["top1"] for t in saved["tasks"]) / 5)
    assert saved["accuracy_matrix"][-1] == saved["tasks"][-1]["cnn"]["per_task"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "replay" and cfg["memory"]["size"] == 60 and cfg["scenario"]["class_order"] == "seed"
    assert "class order" in (run / "log.txt").read_text()
    assert metrics["summary"] == s
    assert all(t["memory_size"] <= 60 for t in saved["tasks"])


def test_resume_after_task_2_equals_the_uninterrupted_run(run_cut_and_resumed):
    full, partial, resumed = run_cut_and_resumed(_cfg(method="replay"), cut_at=2)
    assert len(partial["tasks"]) == 2 and not partial["complete"]
    assert resumed["complete"] and _figures(resumed) == _figures(full)


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_a_run_folder_is_never_overwritten(tmp_path):
    Experiment(_cfg(method="finetune", scenario={"name": "B6-Inc4"}), tmp_path / "r", progress="off").execute()
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--progress", "off"]) == 2


def test_finetune_masked_ce_leaves_old_rows_untouched(tmp_path):
    cfg = _cfg(method="finetune", method_args={"ce_mask": "new"}, scenario={"name": "B6-Inc4"}, train={"weight_decay": 0.0})
    exp = Experiment(cfg, tmp_path / "r", progress="off")
    driver = exp.driver
    first, second = exp.scenario.tasks
    driver.run_task(first)
    old_rows = driver.net.head.blocks[0].weight.detach().clone()
    backbone_before = driver.net.backbone.layers[0].weight.detach().clone()
    driver.run_task(second)
    assert torch.equal(driver.net.head.blocks[0].weight, old_rows)
    assert not torch.equal(driver.net.backbone.layers[0].weight, backbone_before)  # the backbone did train


def test_joint_trains_on_all_seen_data_and_replay_on_new_plus_memory(tmp_path):
    joint = Experiment(_cfg(method="joint"), tmp_path / "j", progress="off")
    replay = Experiment(_cfg(method="replay"), tmp_path / "r", progress="off")
    tasks = joint.scenario.tasks
    for exp in (joint, replay):
        exp.driver.run_task(tasks[0])
        exp.driver.run_task(tasks[1])
    n_train = [int((joint.runtime.train_data.labels < t.stop).sum()) for t in tasks[:2]]
    assert [r["train_images"] for r in joint.driver.records] == [2 * n for n in n_train]  # 2 epochs
    new = int(((replay.runtime.train_data.labels >= 2) & (replay.runtime.train_data.labels < 4)).sum())
    assert replay.driver.records[1]["train_images"] == 2 * (new + 60)


def test_report_compares_runs(tmp_path, capsys):
    for method in ("finetune", "joint"):
        Experiment(_cfg(method=method, scenario={"name": "B6-Inc4"}), tmp_path / method, progress="off").execute()
    plot, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert main(["report", str(tmp_path / "finetune"), str(tmp_path / "joint"), "--plot", str(plot), "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "avg_inc_acc" in out and "finetune" in out and "joint" in out
    assert plot.stat().st_size > 1000
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,method")
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow  # the README's promise: 12 epochs a task, about 16 s
def test_cli_default_run_is_the_embedded_digits_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "summary (CNN, %): average incremental accuracy" in out and "NME average" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("replay-digits-B0-Inc2-")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["memory"]["size"] == 200 and cfg["model"]["backbone"] == "convnet"
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary["avg_incremental_accuracy"] > 90
