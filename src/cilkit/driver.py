"""The task driver: takes each task of the scenario through the method's hooks and the one loop.

For every task: ``grow`` and placement on the device, the teacher, ``before_task``, the training
(:func:`cilkit.training.loop.fit` with the method's loss and hooks), ``after_task``, the NME class
means (owned here, refreshed for every method with a memory), the evaluation on every seen class,
and the task's record. It also gives the checkpoint state and restores it. The driver is handed a
built method; it knows no config, no registry and no run folder.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from cilkit.data.scenario import Scenario, Task
from cilkit.memory.nme import class_means, nme_scores
from cilkit.methods.base import Method
from cilkit.metrics import run_summary, task_accuracies
from cilkit.models.init_weights import InitWeights
from cilkit.training.runtime import Runtime, rng_state, set_rng_state
from cilkit.training.stage import OptimizerState

log = logging.getLogger("cilkit")


class PhaseClock:
    """Wall time of the named phases of a task (``with clock("train"): ...``), device work included."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class TaskDriver:
    """Runs one class-incremental experiment: ``method`` on ``scenario`` with ``runtime``."""

    def __init__(self, method: Method, runtime: Runtime, scenario: Scenario, *, topk: int = 5,
                 nme_flip: bool = False, seed: int = 0, info: dict | None = None,
                 optimizer_state: OptimizerState | None = None, init: InitWeights | None = None, train_first: bool = True):
        """``info``: what the run's metrics record about its setting beyond the driver's own (backbone, normalisation);
        ``optimizer_state``: the optimizer state the method's context carries between tasks (``train.keep_optimizer``),
        saved in the checkpoints; ``init``: weights trained elsewhere whose classifier (if any) becomes the first
        task's rows once they are grown; ``train_first=False``: the first task is not trained (that classifier is
        kept as it is; the method's ``after_task``, the memory and the evaluation run as for any task)."""
        self.method = method
        self.runtime = runtime
        self.scenario = scenario
        self.topk = topk
        self.nme_flip = nme_flip
        self.seed = seed
        self.info = dict(info or {})
        self.optimizer_state = optimizer_state
        self.init = init
        self.train_first = train_first
        self.class_means: torch.Tensor | None = None
        self.records: list[dict] = []
        self.next_task = 0

    @property
    def net(self):
        return self.method.net

    @property
    def memory(self):
        return self.method.memory

    # -- one task --------------------------------------------------------------------------------

    def open_task(self, task: Task) -> None:
        """Everything before training: the new structure on the device, the teacher, ``before_task``."""
        m = self.method
        m.task = task
        m.grow(task)
        if task.index == 0 and self.init is not None and self.init.head_weight is not None:
            self.init.load_head(self.net)
        self.runtime.place(self.net)
        m.start_task(task)
        m.before_task(task)

    def run_task(self, task: Task) -> dict:
        start = time.perf_counter()
        m = self.method
        clock = PhaseClock()
        with clock("before_task"):
            self.open_task(task)
        n_tasks = len(self.scenario.tasks)
        with clock("train"):
            if task.index == 0 and not self.train_first:
                log.info("task 1/%d: the classifier of %s is kept as it is (model.init_first: keep)", n_tasks, self.init.path)
                stats = {"images": 0, "seconds": 0.0, "images_per_s": 0.0}
            else:
                stats = m.fit(m.param_groups(task), m.train_indices(task), m.stage(task), m.loss,
                              desc=f"task {task.index + 1}/{n_tasks}", stream=True)
        with clock("after_task"):  # the method's post-processing, extra stages and exemplar selection
            m.after_task(task)
            m.end_task(task)
        if self.memory is not None:
            with clock("class_means"):
                self.class_means = class_means(self.memory, m.features, self.nme_flip, task.stop)
        record = {"task": task.index, "classes": [task.start, task.stop], "n_seen": task.stop}
        with clock("evaluate"):
            record.update(self.evaluate(task))
        record.update(m.task_metrics())
        record.update(
            train_images=stats["images"], train_seconds=stats["seconds"], train_images_per_s=stats["images_per_s"],
            memory_size=len(self.memory) if self.memory is not None else 0,
            phase_seconds=clock.seconds,
            wall_time_s=time.perf_counter() - start,
        )
        self.records.append(record)
        self.next_task = task.index + 1
        nme = f" | NME {record['nme']['top1']:.2f}" if "nme" in record else ""
        log.info(
            "task %d/%d | %d classes | CNN %.2f%s | %.1fs (%.0f img/s)",
            task.index + 1, n_tasks, task.stop, record["cnn"]["top1"], nme, record["wall_time_s"], stats["images_per_s"],
        )
        return record

    def remaining_tasks(self) -> list[Task]:
        return self.scenario.tasks[self.next_task :]

    @torch.no_grad()
    def evaluate(self, task: Task) -> dict:
        """CNN (and NME) accuracy on the test samples of every class seen up to ``task``.

        Class-incremental: the CNN prediction is the argmax over the seen classes' logits
        (``logits[:, :n_seen]``), so the columns of a fixed head's classes not seen yet take no part."""
        rt, n_seen = self.runtime, task.stop
        bounds = self.scenario.boundaries[: task.index + 2]
        idx = rt.test_data.indices_of(range(n_seen))
        self.net.eval()
        logits, feats, labels = [], [], []
        for x, y in rt.test_batches(rt.test_data, idx):
            with rt.autocast():
                out = self.method.inference(x)
            logits.append(out["logits"][:, :n_seen].float())
            if self.class_means is not None:
                feats.append(out["features"].float())
            labels.append(y)
        labels = torch.cat(labels)
        result = {"cnn": task_accuracies(torch.cat(logits), labels, bounds, self.topk)}
        if self.class_means is not None:
            scores = nme_scores(torch.cat(feats), self.class_means)
            result["nme"] = task_accuracies(scores, labels, bounds, self.topk)
        return result

    # -- results and checkpoints ------------------------------------------------------------------

    def metrics(self) -> dict:
        """Everything measured so far: per-task figures, the summary and the accuracy matrices."""
        summary, matrices = run_summary(self.records, self.topk)
        return {
            "method": self.method.name,
            "dataset": self.scenario.dataset.name,
            "scenario": self.scenario.name,
            "increments": self.scenario.increments,
            "class_order": self.scenario.order,
            "seed": self.seed,
            "topk": self.topk,
            **self.info,
            "device": str(self.runtime.device),
            "complete": len(self.records) == len(self.scenario.tasks),
            "summary": summary,
            "tasks": self.records,
            **matrices,
        }

    def state_dict(self) -> dict:
        return {
            "next_task": self.next_task,
            "net": self.net.state_dict(),
            "method": self.method.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "class_means": self.class_means,
            "records": self.records,
            "optimizer": self.optimizer_state.state_dict() if self.optimizer_state is not None else None,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the structure of the finished tasks, then load their state and the RNG."""
        for task in self.scenario.tasks[: state["next_task"]]:
            self.method.task = task
            self.method.grow(task)
        self.runtime.place(self.net)
        self.net.load_state_dict(state["net"])
        self.method.load_state_dict(state["method"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        cm = state["class_means"]
        self.class_means = cm.to(self.runtime.device) if cm is not None else None
        if self.optimizer_state is not None and state.get("optimizer") is not None:
            self.optimizer_state.load_state_dict(state["optimizer"])
        self.records = state["records"]
        self.next_task = state["next_task"]
        set_rng_state(state["rng"])
