"""The one training loop that every method runs through, and the task-by-task driver around it.

``Engine.run`` takes each task in turn: the method grows the network and prepares the task, the
engine trains (``fit``) on the indices the method names with the loss the method computes, the
method post-processes (memory, class means), the engine evaluates on every seen class and writes a
checkpoint. Methods with extra stages (balanced finetuning, bias correction) call ``fit`` again;
nothing else in cilkit owns a training loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import numpy as np
import torch

from cilkit.config import Config
from cilkit.data.augment import BatchAugment
from cilkit.data.scenario import Scenario, Task
from cilkit.data.store import ImageStore, fits_on_device
from cilkit.engine.optim import Stage, build_optimizer, build_scheduler
from cilkit.engine.progress import Progress
from cilkit.memory.exemplars import ExemplarMemory
from cilkit.memory.nme import class_mean, nme_scores
from cilkit.methods import METHODS
from cilkit.metrics import summarize, task_accuracies
from cilkit.models.network import build_network

log = logging.getLogger("cilkit")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from cilkit.errors import ConfigError

        raise ConfigError("device", "'cuda' was asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    """Runs one class-incremental experiment on an already-built scenario."""

    def __init__(self, cfg: Config, scenario: Scenario, progress: str = "auto"):
        self.cfg = cfg
        self.scenario = scenario
        self.device = resolve_device(cfg.device)
        self.progress = Progress(progress)
        cuda = self.device.type == "cuda"
        self.amp = cuda if cfg.train.amp == "auto" else cfg.train.amp == "true"
        self.channels_last = cuda if cfg.train.channels_last == "auto" else cfg.train.channels_last == "true"
        seed_everything(cfg.seed)

        ds = scenario.dataset
        on_device = {"true": True, "false": False}.get(cfg.data.on_device)
        if on_device is None:
            on_device = fits_on_device(ds.train.images.nbytes + ds.test.images.nbytes, self.device)
        self.train_data = ImageStore(ds.train, self.device, on_device)
        self.test_data = ImageStore(ds.test, self.device, on_device)
        self.augment = BatchAugment(ds.mean, ds.std, cfg.train.augment, cfg.train.crop_pad)
        self.nme_flip = self.augment.flips if cfg.memory.nme_flip == "auto" else cfg.memory.nme_flip == "true"

        method_cls = METHODS[cfg.method]
        self.memory: ExemplarMemory | None = None
        if method_cls.needs_memory:
            per_class = cfg.memory.per_class
            self.memory = ExemplarMemory(None if per_class else cfg.memory.size, per_class, cfg.memory.selection)
        self.class_means: torch.Tensor | None = None
        net = build_network(
            cfg.model.backbone, ds.image_shape, hidden=cfg.model.hidden, widths=cfg.model.widths, **method_cls.backbone_options
        )
        if cfg.train.compile:
            net.backbone.compile(dynamic=False)
        self.method = method_cls(method_cls.parse_args(cfg.method_args), net, self)
        self.records: list[dict] = []
        self.next_task = 0

    @property
    def net(self):
        return self.method.net

    # -- the training loop ------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def fit(
        self,
        groups: list[dict],
        indices: torch.Tensor,
        stage: Stage,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        desc: str = "",
        batches: Callable[[torch.Tensor, int], list[torch.Tensor]] | None = None,
    ) -> dict:
        """Train ``groups`` for ``stage.epochs`` epochs over the training samples ``indices``.

        ``batches(indices, batch_size)`` gives one epoch's index batches (the method's
        ``epoch_batches`` by default: a shuffled pass). Batches are drawn from the in-memory store and
        augmented as a whole on the device; ``loss_fn(x, y)`` gives the loss of a batch. Returns the
        images seen and the time taken.
        """
        batches = batches or self.method.epoch_batches
        plan = batches(indices, stage.batch_size)
        steps = len(plan)
        if steps == 0:
            raise RuntimeError(f"{desc}: {len(indices)} training samples are too few for a batch")
        optimizer = build_optimizer(groups, stage)
        scheduler = build_scheduler(optimizer, stage, steps)
        self.progress.start_stage(desc, stage.epochs)
        seen, start = 0, time.perf_counter()
        for epoch in range(stage.epochs):
            self.method.train_mode()
            if epoch > 0:
                plan = batches(indices, stage.batch_size)
            self.progress.start_epoch(epoch, len(plan))
            t0, total, n_epoch = time.perf_counter(), torch.zeros((), device=self.device), 0
            for idx in plan:
                x, y = self.train_data.batch(idx)
                x = self._prepare(self.augment.train(x) if stage.augment else self.augment.test(x))
                with self.autocast():
                    loss = loss_fn(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                self.method.after_step()
                total += loss.detach().float()
                n_epoch += len(y)
                self.progress.step()
            seen += n_epoch
            rate = n_epoch / (time.perf_counter() - t0)
            self.progress.end_epoch(epoch, stage.epochs, total.item() / len(plan), optimizer.param_groups[0]["lr"], rate)
        self.progress.end_stage()
        seconds = time.perf_counter() - start
        return {"images": seen, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}

    # -- features, memory, evaluation ---------------------------------------------------------------

    @torch.no_grad()
    def extract_features(self, indices: torch.Tensor, flip: bool = False, split: str = "train") -> torch.Tensor:
        """Features of the samples ``indices`` under test-time transforms (mirrored if ``flip``)."""
        store = self.train_data if split == "train" else self.test_data
        self.net.eval()
        out = []
        for x, _ in store.iter_batches(indices, self.cfg.eval.batch_size):
            x = self.augment.test(x)
            x = self._prepare(x.flip(3) if flip else x)
            with self.autocast():
                out.append(self.method.inference(x)["features"].float())
        if not out:
            return torch.empty(0, self.net.feature_dim, device=self.device)
        return torch.cat(out)

    def update_memory(self, task: Task) -> None:
        """Select the new classes' exemplars (shrinking the old ones), then recompute class means."""
        self.memory.update(task.classes, lambda c: self.train_data.indices_of([c]), self.extract_features)
        self.class_means = self.compute_class_means()

    def compute_class_means(self) -> torch.Tensor:
        """NME class means from the exemplars (and their flips when ``nme_flip``), one per class."""
        idx = self.memory.indices()
        feats = self.extract_features(idx)
        flipped = self.extract_features(idx, flip=True) if self.nme_flip else None
        means, start = [], 0
        for c in self.memory.classes:
            k = len(self.memory.exemplars[c])
            means.append(class_mean(feats[start : start + k], None if flipped is None else flipped[start : start + k]))
            start += k
        return torch.stack(means)

    @torch.no_grad()
    def evaluate(self, task: Task) -> dict:
        """CNN (and NME) accuracy on the test samples of every class seen up to ``task``."""
        n_seen = task.stop
        bounds = self.scenario.boundaries[: task.index + 2]
        idx = self.test_data.indices_of(range(n_seen))
        self.net.eval()
        logits, feats, labels = [], [], []
        for x, y in self.test_data.iter_batches(idx, self.cfg.eval.batch_size):
            with self.autocast():
                out = self.method.inference(self._prepare(self.augment.test(x)))
            logits.append(out["logits"][:, :n_seen].float())
            if self.class_means is not None:
                feats.append(out["features"].float())
            labels.append(y)
        labels = torch.cat(labels)
        result = {"cnn": task_accuracies(torch.cat(logits), labels, bounds, self.cfg.eval.topk)}
        if self.class_means is not None:
            result["nme"] = task_accuracies(nme_scores(torch.cat(feats), self.class_means), labels, bounds, self.cfg.eval.topk)
        return result

    # -- the task loop --------------------------------------------------------------------------

    def run_task(self, task: Task) -> dict:
        start = time.perf_counter()
        m = self.method
        m.task = task
        m.grow(task)
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        m.before_task(task)
        stage = m.stage(task)
        n_tasks = len(self.scenario.tasks)
        stats = self.fit(m.param_groups(task), m.train_indices(task), stage, m.loss, desc=f"task {task.index + 1}/{n_tasks}")
        m.after_task(task)
        record = {"task": task.index, "classes": [task.start, task.stop], "n_seen": task.stop}
        record.update(self.evaluate(task))
        record.update(m.task_metrics())
        record.update(
            train_images=stats["images"], train_seconds=stats["seconds"], train_images_per_s=stats["images_per_s"],
            memory_size=len(self.memory) if self.memory is not None else 0,
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

    # -- results and checkpoints ----------------------------------------------------------------

    def metrics(self) -> dict:
        """Everything measured so far: per-task figures, matrices and the summary."""
        recs = self.records
        out = {
            "method": self.cfg.method,
            "dataset": self.scenario.dataset.name,
            "scenario": self.scenario.name,
            "increments": self.scenario.increments,
            "class_order": self.scenario.order,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "complete": len(recs) == len(self.scenario.tasks),
            "summary": {},
            "tasks": recs,
        }
        if not recs:
            return out
        summary = {}
        for head in ("cnn", "nme"):
            if head not in recs[0]:
                continue
            acc = [r[head]["top1"] for r in recs]
            R = [r[head]["per_task"] for r in recs]
            k = f"top{self.cfg.eval.topk}"
            figures = summarize(acc, R)
            figures["avg_incremental_" + k] = sum(r[head][k] for r in recs) / len(recs)
            figures["last_" + k] = recs[-1][head][k]
            prefix = "" if head == "cnn" else "nme_"
            summary.update({prefix + key: v for key, v in figures.items()})
            out[prefix + "accuracy_matrix"] = R
        summary["wall_time_s"] = sum(r["wall_time_s"] for r in recs)
        summary["train_images_per_s"] = sum(r["train_images"] for r in recs) / max(sum(r["train_seconds"] for r in recs), 1e-9)
        out["summary"] = summary
        return out

    def state_dict(self) -> dict:
        return {
            "next_task": self.next_task,
            "net": self.net.state_dict(),
            "method": self.method.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "class_means": self.class_means,
            "records": self.records,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the structure of the finished tasks, then load their state and the RNG."""
        for task in self.scenario.tasks[: state["next_task"]]:
            self.method.task = task
            self.method.grow(task)
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.net.load_state_dict(state["net"])
        self.method.load_state_dict(state["method"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        cm = state["class_means"]
        self.class_means = cm.to(self.device) if cm is not None else None
        self.records = state["records"]
        self.next_task = state["next_task"]
        set_rng_state(state["rng"])
