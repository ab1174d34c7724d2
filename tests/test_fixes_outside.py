"""What broke when cilkit was tried from outside: each case failed before its fix."""

from __future__ import annotations

import json

import pytest

import cilkit
from cilkit.cli import main
from cilkit.results.report import metrics_csv, task_table

FAST = {"model": {"backbone": "mlp", "hidden": [32]}, "train": {"epochs": 1}, "scenario": {"name": "B6-Inc4"}}


def test_topk_1_runs_and_reports(tmp_path):
    metrics = cilkit.run({**FAST, "method": "replay", "memory": {"size": 40}, "eval": {"topk": 1}}, run_dir=tmp_path / "r")
    assert metrics["complete"] and metrics["topk"] == 1
    assert "top1" in task_table(metrics).splitlines()[0]
    rows = metrics_csv(metrics).strip().splitlines()
    assert rows[0].split(",")[2:4] == ["top1", "top1"] and len(rows) == 3


def test_a_full_disk_is_one_message_and_the_folder_stays_consistent(tmp_path, monkeypatch, capsys):
    import errno

    import cilkit.results.rundir as rundir

    original, calls = rundir.atomic_write_bytes, []

    def full_after_the_first_task(path, data):
        calls.append(path.name)
        if "task_001" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", full_after_the_first_task)
    run = tmp_path / "r"
    argv = ["run", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "1", "--run-dir", str(run), "--progress", "off"]
    assert main(argv + ["--set", "model.backbone=mlp"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cilkit: error:") and "No space left on device" in last and "--resume" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_000.pt"]
    assert json.loads((run / "metrics.json").read_text())["tasks"][0]["task"] == 0


def test_a_loss_that_diverges_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["run", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "2", "--run-dir", str(run), "--progress", "off",
            "--set", "model.backbone=mlp"]
    assert main(argv + ["--set", "train.lr=1e12", "--set", "train.first_lr=0.05"]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "task 2/2" in last and ("nan" in last or "inf" in last) and "train.lr" in last and "task_000.pt" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["task_000.pt"]
    assert len(json.loads((run / "metrics.json").read_text())["tasks"]) == 1


def test_config_yaml_is_the_whole_resolved_config_and_resumes(tmp_path):
    import yaml

    exp = cilkit.Experiment(cilkit.resolve([{**FAST, "method": "lwf"}]), tmp_path / "r", progress="off")
    exp.start()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["method_args"] == {"lambda_kd": 1.0, "T": 2.0, "t2": False, "ce_mask": "new", "warmup_epochs": 0}
    assert cilkit.resolve([saved]).method_args == saved["method_args"]


def test_a_users_own_arrays_get_plain_defaults_and_the_schedule_is_logged(tmp_path, caplog):
    import logging

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), "y_train": np.repeat(np.arange(4), 10),
              "x_test": rng.integers(0, 255, (8, 8, 8, 1), dtype=np.uint8), "y_test": np.repeat(np.arange(4), 2)}
    np.savez(tmp_path / "mine.npz", **arrays)
    cfg = cilkit.resolve([{"data": {"dataset": "numpy", "root": str(tmp_path / "mine.npz")}, "train": {"epochs": 1},
                           "method": "finetune"}])
    assert cfg.train.first_epochs is None and cfg.train.augment == "none" and cfg.train.stage(0).epochs == 1
    with caplog.at_level(logging.INFO, logger="cilkit"):
        cilkit.Experiment(cfg, tmp_path / "r", progress="off").execute()
    assert any("schedule: every task: 1 epochs" in r.getMessage() for r in caplog.records)


def test_threads_option(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["run", "--threads", "1", "--method", "finetune", "--scenario", "B6-Inc4", "--epochs", "1",
                     "--set", "model.backbone=mlp", "--run-dir", str(tmp_path / "r"), "--progress", "off"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["run", "--threads", "0", "--run-dir", str(tmp_path / "x")]) == 2
