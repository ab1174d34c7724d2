"""Class-incremental metrics (docs/spec.md §1.4), all in percent.

``R[t][j]`` is the accuracy after task ``t`` on the test samples of task ``j`` (``j <= t``),
predicting over every class seen so far. ``A_t`` is the accuracy after task ``t`` on all seen test
samples. Forgetting and backward transfer are grouped by the real task boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Matrix = Sequence[Sequence[float]]


def average_incremental_accuracy(acc: Sequence[float]) -> float:
    """(1/T) sum_t A_t, the first task included (iCaRL, PyCIL, SS-IL)."""
    return float(sum(acc) / len(acc))


def average_forgetting(R: Matrix) -> float:
    """Chaudhry et al. (2018): 1/(T-1) sum_{j<T} max_{t in [j, T-1]} (R[t][j] - R[T][j]).

    With one task there is nothing to forget: 0.
    """
    T = len(R)
    if T < 2:
        return 0.0
    last = R[-1]
    drops = [max(R[t][j] for t in range(j, T - 1)) - last[j] for j in range(T - 1)]
    return float(sum(drops) / (T - 1))


def backward_transfer(R: Matrix) -> float:
    """Lopez-Paz & Ranzato (2017): 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]); negative = forgetting."""
    T = len(R)
    if T < 2:
        return 0.0
    return float(sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1))


def task_accuracies(
    scores: torch.Tensor, labels: torch.Tensor, boundaries: Sequence[int], topk: int = 5
) -> dict:
    """Accuracy figures of one evaluation over the first ``t+1`` tasks.

    ``scores``: (N, n_seen) for the test samples of the seen classes; ``boundaries``: the first class
    of every seen task and the number of seen classes, ``[0, b1, ..., n_seen]``. Returns top-1, top-k,
    the per-task row ``R[t][:]``, and old/new accuracy (old = tasks before the last; ``None`` for
    the first task).
    """
    n_seen = boundaries[-1]
    k = min(topk, n_seen)
    top = scores.topk(k, dim=1).indices
    hit1 = (top[:, 0] == labels).float()
    hitk = (top == labels[:, None]).any(1).float()
    task_of = torch.bucketize(labels, torch.tensor(boundaries[1:], device=labels.device), right=True)
    n_tasks = len(boundaries) - 1
    counts = torch.bincount(task_of, minlength=n_tasks).float()
    per_task = torch.bincount(task_of, weights=hit1, minlength=n_tasks) / counts.clamp(min=1)
    old_mask = labels < boundaries[-2]
    result = {
        "top1": 100.0 * hit1.mean().item(),
        f"top{topk}": 100.0 * hitk.mean().item(),
        "per_task": [100.0 * v for v in per_task.tolist()],
        "old": 100.0 * hit1[old_mask].mean().item() if n_tasks > 1 else None,
        "new": 100.0 * hit1[~old_mask].mean().item(),
    }
    return result


def last_task_mean_accuracy(R: Matrix) -> float:
    """(1/T) sum_j R[T][j]: the mean over tasks of the final accuracy on each task's test data, every task
    weighted the same whatever its number of classes and samples (Mammoth/DER, ER-ACE report this)."""
    return float(sum(R[-1]) / len(R[-1]))


def summarize(acc: Sequence[float], R: Matrix) -> dict:
    """Average incremental accuracy, last accuracy (over all seen samples, and the task mean), average
    forgetting and BWT of one run."""
    return {
        "avg_incremental_accuracy": average_incremental_accuracy(acc),
        "last_accuracy": float(acc[-1]),
        "last_task_mean_accuracy": last_task_mean_accuracy(R),
        "avg_forgetting": average_forgetting(R),
        "bwt": backward_transfer(R),
    }


def run_summary(records: Sequence[dict], topk: int) -> tuple[dict, dict]:
    """The summary figures of a run from its per-task records, and its accuracy matrices.

    For the CNN head (and the NME one when recorded): average incremental and last accuracy (top-1
    and top-k), the last accuracy as a mean over tasks, average forgetting and BWT; then the wall time and
    the training throughput. The NME figures carry the prefix ``nme_``. Returns ``(summary, {"accuracy_matrix": R, ...})``.
    """
    summary: dict = {}
    matrices: dict = {}
    if not records:
        return summary, matrices
    k = f"top{topk}"
    for head in ("cnn", "nme"):
        if head not in records[0]:
            continue
        acc = [r[head]["top1"] for r in records]
        R = [r[head]["per_task"] for r in records]
        figures = summarize(acc, R)
        figures["avg_incremental_" + k] = sum(r[head][k] for r in records) / len(records)
        figures["last_" + k] = records[-1][head][k]
        prefix = "" if head == "cnn" else "nme_"
        summary.update({prefix + key: v for key, v in figures.items()})
        matrices[prefix + "accuracy_matrix"] = R
    summary["wall_time_s"] = sum(r["wall_time_s"] for r in records)
    images, seconds = sum(r["train_images"] for r in records), sum(r["train_seconds"] for r in records)
    summary["train_images_per_s"] = images / max(seconds, 1e-9)
    return summary, matrices
