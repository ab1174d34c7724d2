import pytest
import torch

from cilkit.metrics import (
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    last_task_mean_accuracy,
    run_summary,
    summarize,
    task_accuracies,
)
from cilkit.results.report import COMPARE_HEADER, comparison_rows, summary_text

# R[t][j]: accuracy after task t on task j
R = [
    [90.0],
    [60.0, 80.0],
    [50.0, 70.0, 85.0],
    [40.0, 75.0, 60.0, 88.0],
]


def test_forgetting_on_a_hand_made_matrix():
    # task 0: best before the last step 90, now 40 -> 50; task 1: max(80, 70) - 75 = 5; task 2: 85 - 60 = 25
    assert average_forgetting(R) == pytest.approx((50 + 5 + 25) / 3)


def test_backward_transfer_on_a_hand_made_matrix():
    # (40 - 90) + (75 - 80) + (60 - 85) over 3
    assert backward_transfer(R) == pytest.approx((-50 - 5 - 25) / 3)


def test_average_incremental_and_last_accuracy_include_the_first_task():
    acc = [90.0, 70.0, 68.0, 65.0]
    s = summarize(acc, R)
    assert average_incremental_accuracy(acc) == pytest.approx(73.25)
    assert s["last_accuracy"] == 65.0 and s["avg_incremental_accuracy"] == pytest.approx(73.25)
    assert summarize([90.0], [[90.0]])["avg_forgetting"] == 0.0


def test_task_accuracies_groups_by_real_task_boundaries():
    # 3 tasks of sizes 2, 3, 1 -> boundaries [0, 2, 5, 6]; 6 test samples, one per class
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    scores = torch.full((6, 6), -1.0)
    pred = torch.tensor([0, 2, 2, 3, 1, 5])  # wrong on samples 1 and 4
    scores[torch.arange(6), pred] = 1.0
    scores[1, 1] = 0.5  # the right class is second for sample 1 (top-k hit)
    scores[4, 4] = 0.5
    r = task_accuracies(scores, labels, [0, 2, 5, 6], topk=2)
    assert r["top1"] == pytest.approx(100 * 4 / 6)
    assert r["top2"] == pytest.approx(100.0)
    assert r["per_task"] == pytest.approx([50.0, 100 * 2 / 3, 100.0])
    assert r["old"] == pytest.approx(100 * 3 / 5) and r["new"] == pytest.approx(100.0)
    first = task_accuracies(scores[:2, :2], labels[:2], [0, 2], topk=5)
    assert first["old"] is None and first["top5"] == 100.0


def test_last_task_mean_accuracy_weighs_tasks_not_samples():
    # tasks of 2 classes and 1 class; after the last task: task 0's 6 test samples all right, task 1's 2 all
    # wrong -> class-weighted (over samples) 6/8 = 75, task mean (100 + 0) / 2 = 50
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    scores = torch.nn.functional.one_hot(pred, 3).float()
    first = task_accuracies(scores[:6, :2], labels[:6], [0, 2], topk=1)
    last = task_accuracies(scores, labels, [0, 2, 3], topk=1)
    assert last["per_task"] == pytest.approx([100.0, 0.0]) and last["top1"] == pytest.approx(75.0)
    assert last_task_mean_accuracy([first["per_task"], last["per_task"]]) == pytest.approx(50.0)
    timing = {"wall_time_s": 1.0, "train_images": 8, "train_seconds": 1.0}
    nme_first, nme_last = {**first, "per_task": [80.0]}, {**last, "per_task": [90.0, 30.0]}
    records = [{"cnn": first, "nme": nme_first, **timing}, {"cnn": last, "nme": nme_last, **timing}]
    summary, matrices = run_summary(records, topk=1)
    assert summary["last_accuracy"] == pytest.approx(75.0)
    assert summary["last_task_mean_accuracy"] == pytest.approx(50.0)
    assert summary["nme_last_task_mean_accuracy"] == pytest.approx(60.0)
    assert matrices["accuracy_matrix"][-1] == pytest.approx([100.0, 0.0])
    assert "last accuracy 75.00 (task mean 50.00)" in summary_text({"summary": summary})
    (row,) = comparison_rows([("run", {"method": "replay", "summary": summary, "tasks": records, "complete": True})])
    assert row[COMPARE_HEADER.index("last_task_mean")] == pytest.approx(50.0)
    assert summarize([90.0], [[90.0]])["last_task_mean_accuracy"] == 90.0
