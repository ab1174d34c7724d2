"""A trained run as a model: ``cilkit.load(RUN)`` rebuilds the run's network and method from its
``config.yaml`` and a checkpoint, without reading the dataset again, and predicts class names.

The images go through the run's own preprocessing: decoded with PIL to the run's channels (grayscale or
RGB), an image of another size resized to cover the run's stored size and centre-cropped to it (the resize of
``data.image_size`` and of ``cilkit extend``, so a file predicts as it trained), zero-padded by ``data.pad``, and normalised with the statistics recorded in
``config.yaml``. The scores are those of the run's evaluation: ``method.inference`` over the seen classes
(the classifier, ``head="cnn"``), or minus the squared distance to the NME class means (``head="nme"``,
for a method that keeps exemplars). Probabilities are the softmax of the scores over the seen classes (for
NME, of minus the squared distances: a ranking, not a calibrated probability).

Every file is read as data: the checkpoint with ``weights_only=True``, the config with ``yaml.safe_load``,
the metrics as JSON; a checkpoint holding code is refused before anything of it runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cilkit.config import Config
from cilkit.data.datasets import Dataset, ImageSet
from cilkit.data.inputs import InputError, Preprocess, batches, collect  # noqa: F401 - InputError: what predict raises
from cilkit.data.scenario import Scenario
from cilkit.driver import TaskDriver
from cilkit.errors import CilkitError
from cilkit.experiment import build_driver, build_scenario, config_digest
from cilkit.memory.nme import nme_scores
from cilkit.models.network import INITS
from cilkit.results.rundir import CheckpointError, RunDir, RunFolderError
from cilkit.schema import from_dict
from cilkit.training.runtime import rng_state, set_rng_state

log = logging.getLogger("cilkit")

HEADS = ("cnn", "nme")
@dataclass
class Predictions:
    """Top-k predictions: ``labels`` (N, k) class labels, ``probabilities`` (N, k), best first; ``sources``
    names each image (its path, or ``file.npz[i]`` / ``images[i]``); ``classes`` the model's class names."""

    sources: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    classes: list[str]
    head: str

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def names(self) -> list[list[str]]:
        return [[self.classes[int(c)] for c in row] for row in self.labels]

    @property
    def top1(self) -> list[str]:
        """The predicted class name of every image."""
        return [self.classes[int(row[0])] for row in self.labels]

    def records(self) -> list[dict]:
        """One dict per image: ``source`` and ``predictions`` [{class, label, probability}], best first."""
        return [{"source": s, "predictions": [{"class": self.classes[int(c)], "label": int(c), "probability": float(p)}
                                              for c, p in zip(row, probs)]}
                for s, row, probs in zip(self.sources, self.labels, self.probabilities)]

    def header(self) -> list[str]:
        k = self.labels.shape[1]
        return ["source", *(f"{what}{i}" for i in range(1, k + 1) for what in ("class", "p"))]

    def rows(self, limit: int | None = None) -> list[list]:
        """``source, class1, p1, class2, p2, ...`` per image (the first ``limit``)."""
        shown = range(len(self) if limit is None else min(limit, len(self)))
        return [[self.sources[i], *(v for c, p in zip(self.labels[i], self.probabilities[i])
                                    for v in (self.classes[int(c)], float(p)))] for i in shown]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header())
        writer.writerows([[v if isinstance(v, str) else f"{v:.6f}" for v in row] for row in self.rows()])
        return buf.getvalue()

    def to_json(self, **about) -> str:
        return json.dumps({**about, "head": self.head, "classes": self.classes, "images": self.records()}, indent=1)

    def table(self, limit: int | None = None) -> str:
        """A terminal table (probabilities in %), the first ``limit`` images."""
        rows = [[v if isinstance(v, str) else f"{100 * v:.1f}%" for v in row] for row in self.rows(limit)]
        cells = [self.header(), *rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.rjust(w) if i and i % 2 == 0 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in cells]  # names to the left, probabilities to the right
        lines.insert(1, "  ".join("-" * w for w in widths))
        if limit is not None and len(self) > limit:
            lines.append(f"... and {len(self) - limit} more")
        return "\n".join(lines)


# -- the model -------------------------------------------------------------------------------------------------


class TrainedModel:
    """A finished task of a run, ready to predict: ``classes`` (names in the order of the model's outputs),
    ``predict(images)``, ``scores(x)``; ``extend(data)`` trains the next task on new classes (a new run)."""

    def __init__(self, run: RunDir, cfg: Config, driver: TaskDriver, classes: list[str], prep: Preprocess, checkpoint: Path,
                 metrics: dict | None = None):
        self.metrics = metrics or {}  # the run's metrics.json (every task's figures), {} when it has none
        self.run = run
        self.cfg = cfg
        self.driver = driver
        self.classes = classes
        self.prep = prep
        self.checkpoint = checkpoint
        for module in self.modules().values():
            module.eval()

    def __repr__(self) -> str:
        return (f"TrainedModel({self.run.path}, method {self.method.name}, task {self.task + 1}, "
                f"{len(self.classes)} classes, heads {', '.join(self.heads)})")

    @property
    def method(self):
        return self.driver.method

    @property
    def device(self) -> torch.device:
        return self.driver.runtime.device

    @property
    def task(self) -> int:
        """The index of the task this model finished (0 for the first)."""
        return self.driver.next_task - 1

    @property
    def n_seen(self) -> int:
        return len(self.classes)

    @property
    def heads(self) -> tuple[str, ...]:
        """``cnn``, and ``nme`` when the method keeps exemplars (class means of the memory)."""
        return HEADS if self.driver.class_means is not None else ("cnn",)

    @property
    def class_means(self) -> torch.Tensor | None:
        cm = self.driver.class_means
        return None if cm is None else cm[: self.n_seen]

    def modules(self) -> dict[str, torch.nn.Module]:
        """The method's modules (its network, and e.g. BiC's bias layers), by attribute name."""
        return {k: v for k, v in vars(self.method).items() if isinstance(v, torch.nn.Module)}

    def check_head(self, head: str) -> None:
        if head not in HEADS:
            raise CilkitError(f"head '{head}' is not allowed; choose one of: {', '.join(HEADS)}")
        if head == "nme" and "nme" not in self.heads:
            raise CilkitError(f"method '{self.method.name}' keeps no exemplars, so the run has no NME head; use head cnn")

    @torch.no_grad()
    def scores(self, images: torch.Tensor | np.ndarray, head: str = "cnn") -> torch.Tensor:
        """Scores over the seen classes of a uint8 (N, H, W, C) batch of the stored size, as the run's
        evaluation computes them (the logits, or minus the squared distance to the NME class means)."""
        self.check_head(head)
        rt = self.driver.runtime
        x = torch.as_tensor(np.asarray(images)).to(rt.device).permute(0, 3, 1, 2)
        if self.prep.pad:
            x = torch.nn.functional.pad(x, (self.prep.pad,) * 4)
        x = rt.to_memory_format(rt.augment.test(x))
        with rt.autocast():
            out = self.method.inference(x)
        if head == "nme":
            return nme_scores(out["features"].float(), self.class_means)
        return out["logits"][:, : self.n_seen].float()

    def predict(self, images, head: str = "cnn", topk: int = 5, batch_size: int | None = None) -> Predictions:
        """Top-``topk`` class names and probabilities of ``images``: a uint8 array (N, H, W[, C]), a path (an
        image file, a folder of them, an .npz), or a list of these."""
        self.check_head(head)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise CilkitError(f"topk must be a positive integer, got {topk!r}")
        k = min(topk, self.n_seen)
        single = isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor))
        items = collect([images] if single else list(images), self.prep)
        size = batch_size or self.driver.runtime.eval_batch_size
        sources, labels, probs = [], [], []
        for names, x in batches(items, self.prep, size):
            p = torch.softmax(self.scores(x, head), dim=1)
            top = p.topk(k, dim=1)
            sources += names
            labels.append(top.indices.cpu().numpy())
            probs.append(top.values.cpu().numpy())
        return Predictions(sources, np.concatenate(labels) if labels else np.zeros((0, k), np.int64),
                           np.concatenate(probs) if probs else np.zeros((0, k), np.float32), self.classes, head)

    def extend(self, data, run_dir: str | os.PathLike | None = None, **kwargs) -> TrainedModel:
        """The model after one more task: the classes of ``data`` (a folder of images by class, an .npz, or arrays
        ``{"x", "y", "class_names"}``) trained with the run's own method, memory and schedule into a new run folder
        (``run_dir``; :func:`cilkit.extend.extend_run`, which takes ``device`` and ``threads`` too); this run is
        left as it is. The new model's ``metrics`` hold the grown accuracy matrix."""
        from cilkit.extend import extend_run  # the training side, imported when used

        last = self.run.checkpoints()
        if not last or last[0] != self.checkpoint:
            raise CilkitError(f"extend continues the last finished task of {self.run.path}; this model is the one after "
                              f"task {self.task + 1}: load the run without task= to extend it")
        result = extend_run(self.run.path, data, run_dir_out=run_dir, **kwargs)
        return load(result["run_dir"], device=str(self.device))


def _checkpoint(run: RunDir, task: int | None) -> Path:
    found = run.checkpoints()
    if not found:
        raise RunFolderError(f"{run.path} has no finished task yet (no checkpoint in {run.checkpoint_dir}): "
                             f"train at least one task first (cilkit run --resume {run.path})")
    if task is None:
        return found[0]
    by_task = {int(RunDir.CHECKPOINT_RE.search(p.name).group(1)): p for p in found}
    if task - 1 not in by_task:
        raise RunFolderError(f"{run.path} has no checkpoint of task {task}; finished tasks: "
                             f"{', '.join(str(t + 1) for t in sorted(by_task))}")
    return by_task[task - 1]


def _skeleton(cfg: Config, metrics: dict | None) -> Scenario:
    """The run's scenario without its images, from what metrics.json records (class names, image shape);
    a run written before those were recorded loads its dataset instead."""
    if not metrics or "class_names" not in metrics or "image_shape" not in metrics:
        log.info("metrics.json records no class names and image shape (an older run): reading the dataset")
        return build_scenario(cfg)
    c, h, w = (int(v) for v in metrics["image_shape"])
    empty = ImageSet(np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64))
    norm = metrics["normalization"]
    ds = Dataset(metrics.get("dataset", cfg.data.dataset), empty, empty, list(metrics["class_names"]),
                 tuple(norm["mean"]), tuple(norm["std"]))
    return Scenario(ds, list(metrics["class_order"]), list(metrics["increments"]), str(metrics["scenario"]))


def load(run_dir: str | os.PathLike, task: int | None = None, device: str = "auto", threads: int | None = None) -> TrainedModel:
    """The model of run ``run_dir`` after its last finished task (or after task ``task``, counted from 1),
    on ``device`` (auto, cpu, cuda, mps); ``threads``: torch's CPU threads (None: left as they are)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunFolderError(f"{run.path} does not exist")
    if not run.exists():
        raise RunFolderError(f"{run.path} is not a cilkit run folder (no config.yaml)")
    try:
        raw = run.read_config()
    except Exception as e:  # noqa: BLE001 - unreadable, not YAML
        raise RunFolderError(f"{run.config_path} cannot be read as a run's config ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise RunFolderError(f"{run.config_path} is not a run's config (not a mapping of settings)")
    digest = config_digest(raw)
    ckpt = _checkpoint(run, task)
    state = run.load_checkpoint(ckpt)  # weights_only: refuses a checkpoint that holds code, before any of it runs
    if state.get("config_sha256") not in (None, digest):
        raise RunFolderError(f"{run.config_path} is not the config that {ckpt} was trained with (edited, or the "
                             "checkpoint is from another run)")
    metrics = None
    if run.metrics_path.is_file():
        try:
            metrics = run.read_metrics()
        except (OSError, ValueError):
            metrics = None
    raw = dict(raw, device=device, threads=threads)
    if raw.get("model", {}).get("init") not in INITS:  # a file the first task started from: the checkpoint replaces it
        raw["model"] = dict(raw["model"], init="torch")
    try:
        cfg = from_dict(Config, raw)  # checked when the run was made; the data need not be here now
    except CilkitError as e:
        raise RunFolderError(f"{run.config_path} is not a config this cilkit can read: {e}") from None
    scenario = _skeleton(cfg, metrics)
    saved = rng_state()  # building and loading seed the global generators: the caller's are given back
    try:
        driver = build_driver(cfg, scenario, progress="off")
        try:
            driver.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {ckpt} does not fit this run's model, method or scenario "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    finally:
        set_rng_state(saved)
    n_seen = scenario.tasks[driver.next_task - 1].stop
    c, h, w = scenario.dataset.image_shape
    pad = cfg.data.pad
    resize = cfg.data.image_size if cfg.data.dataset == "imagefolder" else None  # the one reader that resizes
    prep = Preprocess(c, h - 2 * pad, w - 2 * pad, pad, resize, tuple(scenario.dataset.mean),
                      tuple(scenario.dataset.std))
    return TrainedModel(run, cfg, driver, list(scenario.dataset.class_names[:n_seen]), prep, ckpt, metrics)


def preprocess_info(model: TrainedModel) -> dict:
    """What a caller of an exported model needs to know of its input."""
    return {**dataclasses.asdict(model.prep), "layout": "NHWC uint8"}


def classes_json(model: TrainedModel, head: str | None = None) -> str:
    """The class names in the order of the model's outputs, the run, the task and the input; ``head`` when given
    (the copy inside an exported file says which head it is)."""
    about = {"classes": model.classes, "method": model.method.name, "run": str(model.run.path), "task": model.task + 1}
    if head is not None:
        about["head"] = head
    return json.dumps({**about, "input": preprocess_info(model)}, indent=2)
