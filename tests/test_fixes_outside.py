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
