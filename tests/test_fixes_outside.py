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
