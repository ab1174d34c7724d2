"""The composition root: resolve a config, load the data, build runtime, network, memory, method and
driver, and run them into a run folder.

Everything that can be wrong with a config or its data is found before the run folder is
created and before any training: the run folder holds only complete files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from cilkit.config import NO_NORMALIZATION, Config, validate
from cilkit.data.augment import BatchAugment
from cilkit.data.datasets import pad_images
from cilkit.data.registry import load_dataset
from cilkit.data.scenario import Scenario, make_scenario
from cilkit.data.userdata import append_task, read_new_classes, stream_scenario
from cilkit.data.store import ImageStore, fits_on_device
from cilkit.driver import TaskDriver
from cilkit.errors import CilkitError, ConfigError
from cilkit.memory.exemplars import ExemplarMemory
from cilkit.memory.stream import STREAM_RULES, StreamMemory
from cilkit.methods import METHODS, Method
from cilkit.models.init_weights import head_takes_rows, read_init
from cilkit.models.network import INITS, build_network
from cilkit.presets import load_yaml, merge_layers
from cilkit.results.plots import plot_run
from cilkit.results.report import metrics_csv
from cilkit.results.rundir import CheckpointError, RunDir, RunFolderError, atomic_write_text
from cilkit.schema import from_dict
from cilkit.training.context import TrainingContext
from cilkit.training.loop import TrainingDiverged
from cilkit.training.progress import Progress
from cilkit.training.runtime import Runtime, resolve_device, seed_everything
from cilkit.training.stage import OptimizerState

log = logging.getLogger("cilkit")


def method_class(cfg: Config) -> type[Method]:
    if cfg.method not in METHODS:
        raise ConfigError("method", f"'{cfg.method}' is not allowed; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method]


def check(cfg: Config, budget_given: str | None = None) -> Config:
    """Every check that needs no data: the generic ones, then the method's (arguments, memory, backbone)."""
    cls = method_class(cfg)
    validate(cfg)
    cls.validate(cfg, budget_given)
    return cfg


def resolve(layers: list[dict]) -> Config:
    """Merge the user's layers over the dataset profile and the defaults, then check everything."""
    merged, user = merge_layers(layers)
    cfg = from_dict(Config, merged)
    given = [k for k, v in (user.get("memory") or {}).items() if k in ("size", "per_class") and v]
    return check(cfg, given[0] if given else None)


def uses_memory(cfg: Config) -> bool:
    """A memory is built for a method that requires one, and for one that may use one when a budget is set."""
    use = method_class(cfg).memory_use
    return use == "required" or (use == "optional" and bool(cfg.memory.per_class or cfg.memory.size))


def build_scenario(cfg: Config, stream=None) -> Scenario:
    """Load the dataset and split it into tasks (or take the tasks of a ``stream`` given in Python), then append the
    tasks of ``data.new_classes``, with every data-dependent check."""
    data = cfg.data

    def prepared(dataset):
        dataset = pad_images(dataset, data.pad)  # before a given normalisation replaces the (recomputed) statistics
        if data.normalization is not None:
            dataset.mean, dataset.std = normalization_of(data.normalization, dataset.image_shape[0])
        return dataset

    if stream is not None:  # the scenario follows the given tasks, not a class order
        scenario = stream_scenario(stream, test_fraction=data.split_fraction, seed=data.split_seed)
        loaded_shape = scenario.dataset.image_shape
        scenario.dataset = prepared(scenario.dataset)
    else:
        dataset = load_dataset(data.dataset, data.root, download=data.download, image_size=data.image_size,
                               cache_dir=data.cache_dir)
        loaded_shape = dataset.image_shape
        scenario = make_scenario(prepared(dataset), cfg.scenario.name, cfg.scenario.class_order, cfg.scenario.order_seed,
                                 data.n_classes)
    for i, root in enumerate(data.new_classes):  # after the old images: the memory's indices keep their meaning
        part = read_new_classes(root, loaded_shape, test_fraction=data.split_fraction, seed=data.split_seed)
        scenario = append_task(scenario, pad_images(part, data.pad), f"data.new_classes[{i}] ({root})")
    if (uses_memory(cfg) and cfg.memory.per_class is None and cfg.memory.selection not in STREAM_RULES
            and cfg.memory.size < scenario.n_classes):
        raise ConfigError(
            "memory.size",
            f"a budget of {cfg.memory.size} exemplars cannot hold one per class for the {scenario.n_classes} classes of "
            f"this scenario; give at least {scenario.n_classes} or use memory.per_class",
        )
    return scenario


def normalization_of(given: dict | str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of a ``data.normalization`` mapping, checked against the images' channels; ``none``:
    mean 0 and std 1 (the images only scaled to [0, 1])."""
    if given == NO_NORMALIZATION:
        return (0.0,) * channels, (1.0,) * channels
    if set(given) != {"mean", "std"}:
        raise ConfigError("data.normalization", f"expected the keys mean and std, got {sorted(given)}")
    out = []
    for key in ("mean", "std"):
        values = given[key]
        if (not isinstance(values, list) or len(values) != channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ConfigError(f"data.normalization.{key}", f"expected {channels} numbers (one per channel), got {values!r}")
        if key == "std" and any(v <= 0 for v in values):
            raise ConfigError("data.normalization.std", f"must be positive, got {values}")
        out.append(tuple(float(v) for v in values))
    return out[0], out[1]


def build_driver(cfg: Config, scenario: Scenario, progress: str = "auto") -> TaskDriver:
    """The runtime on the configured device, the network, the memory and the method, in a driver."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ds = scenario.dataset
    on_device = cfg.data.on_device
    if on_device is None:
        on_device = fits_on_device(ds.train.images.nbytes + ds.test.images.nbytes, device)
    augment = BatchAugment(ds.mean, ds.std, cfg.train.augment, cfg.train.crop_pad)
    runtime = Runtime(
        device, ImageStore(ds.train, device, on_device), ImageStore(ds.test, device, on_device), augment,
        amp=cuda if cfg.train.amp is None else cfg.train.amp,
        channels_last=cuda if cfg.train.channels_last is None else cfg.train.channels_last,
        eval_batch_size=cfg.eval.batch_size or (128 if device.type == "cpu" else 1024),
    )
    cls = method_class(cfg)
    memory = None
    if uses_memory(cfg):
        per_class = cfg.memory.per_class
        if cfg.memory.selection in STREAM_RULES:
            memory = StreamMemory(cfg.memory.size, cfg.memory.selection, device, replay_ratio=cfg.memory.replay_ratio)
        else:
            memory = ExemplarMemory(None if per_class else cfg.memory.size, per_class, cfg.memory.selection, cfg.memory.size,
                                    replay_ratio=cfg.memory.replay_ratio)
    hp = cls.parse_args(cfg.method_args)
    # model.head: fixed gives the head a row for every class of the scenario from the start
    from_file = cfg.model.init not in INITS  # a state_dict trained elsewhere: loaded into the backbone before the method sees it
    net = build_network(cfg.model.backbone, ds.image_shape, hidden=cfg.model.hidden, widths=cfg.model.widths,
                        head=cfg.model.head, n_classes=scenario.n_classes, init="torch" if from_file else cfg.model.init,
                        **cls.backbone_kwargs(hp))
    init = None
    if from_file:
        init = read_init(cfg.model.init, net.backbone)
        init.load_backbone(net.backbone)
    if cfg.train.compile:
        net.backbone.compile(dynamic=False)
    # the network's parameters at the time asked: the state is keyed by them (and by their positions in a checkpoint)
    optimizer_state = OptimizerState(net.parameters) if cfg.train.keep_optimizer else None
    ctx = TrainingContext(runtime, memory, cfg.seed, cfg.train.stage, Progress(progress), optimizer_state)
    method = cls(hp, net, ctx)
    net.apply_init()  # model.init on the linear layers the method added (a head it replaced, a projection head)
    if init is not None:
        check_init_head(cfg, init, net, scenario, cls)
    nme_flip = augment.flips if cfg.memory.nme_flip is None else cfg.memory.nme_flip
    info = {"backbone": cfg.model.backbone, "normalization": {"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std]},
            # the name of each class label the model outputs (the scenario's order) and the (C, H, W) it takes, padding
            # included: what cilkit.load needs to predict without reading the dataset again
            "class_names": [str(n) for n in ds.class_names], "image_shape": [int(v) for v in ds.image_shape]}
    if cfg.lineage:  # the runs this one was extended from, oldest first
        info["lineage"] = list(cfg.lineage)
    if init is not None:
        info["init"] = {"path": init.path, "first_task": cfg.model.init_first, "head_rows": init.n_head}
    return TaskDriver(method, runtime, scenario, topk=cfg.eval.topk, nme_flip=nme_flip, seed=cfg.seed, info=info,
                      optimizer_state=optimizer_state, init=init, train_first=cfg.model.init_first != "keep")


def check_init_head(cfg: Config, init, net, scenario: Scenario, cls: type[Method]) -> None:
    """Whether the classifier of ``model.init`` becomes the first task's rows: a linear head of the first task's size.

    Otherwise only the backbone is loaded (``init_first: train``), or the run is refused (``keep``)."""
    first = scenario.tasks[0].n_classes
    why = None
    if init.head_weight is None:
        why = f"{init.path} holds no linear classifier (fc, head, classifier or linear)"
    elif not head_takes_rows(net):
        why = f"method '{cls.name}' replaces the linear classifier ({type(net.head).__name__})"
    elif init.n_head != first:
        why = f"its classifier has {init.n_head} rows but the first task has {first} classes"
    if why is None and cfg.model.init_first == "keep" and uses_memory(cfg) and cfg.memory.selection in STREAM_RULES:
        raise ConfigError("model.init_first", f"a {cfg.memory.selection} memory fills as the first task's data pass in "
                          "training, which keep skips; use train")
    if why is None:
        return
    if cfg.model.init_first == "keep":
        raise ConfigError("model.init_first", f"keep needs the first task's classifier in model.init: {why}; use train")
    if init.head_weight is not None:
        log.info("model.init: only the backbone is loaded (%s)", why)
    init.head_weight = init.head_bias = None


def config_digest(config: dict) -> str:
    """SHA-256 of a run's config without the settings that may change on resume (device, threads)."""
    kept = {k: v for k, v in config.items() if k not in ("device", "threads")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def schedule_text(cfg: Config, n_tasks: int) -> str:
    """The resolved training schedule in one line: the first task's, then the later tasks' if different."""

    def one(stage) -> str:
        ms = f" milestones {stage.milestones}" if stage.schedule == "multistep" else ""
        return (f"{stage.epochs} epochs, {stage.optimizer} lr {stage.lr:g} ({stage.schedule}{ms}), "
                f"weight decay {stage.weight_decay:g}, batch {stage.batch_size}, augment {cfg.train.augment}")

    first, later = cfg.train.stage(0), cfg.train.stage(1)
    if n_tasks == 1 or first == later:
        return f"every task: {one(first)}"
    return f"task 1: {one(first)}; tasks 2-{n_tasks}: {one(later)}"


RUNS = Path("runs")  # where run folders go by default, below the working directory


def default_run_dir(cfg: Config, scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.method}-{cfg.data.dataset}-{scenario.name}-{stamp}"
    return RUNS / name


def _has_console(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` reaches a stream (its own handlers or, propagating, the root's)."""
    node = logger
    while node is not None:
        if any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def _attach_log(run: RunDir) -> logging.Handler:
    handler = logging.FileHandler(run.log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler


class Experiment:
    """A driver bound to a run folder: writes config, metrics, plot and checkpoints."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, progress: str = "auto", scenario: Scenario | None = None,
                 stream=None):
        """``stream``: the tasks given in Python (``data.dataset: stream``; :func:`run`)."""
        self.cfg = cfg
        # What can be checked without the data is checked first: the device, the run folder.
        resolve_device(cfg.device)
        if run_dir is not None:
            RunDir(run_dir).check_writable()
        else:
            RunDir(RUNS).check_writable()
        self.scenario = scenario or build_scenario(cfg, stream)
        self.run = RunDir(run_dir or default_run_dir(cfg, self.scenario))
        self.driver = build_driver(cfg, self.scenario, progress)
        self.progress = progress
        self.resumed = False
        self.digest: str | None = None

    @property
    def method(self) -> Method:
        return self.driver.method

    @property
    def runtime(self) -> Runtime:
        return self.driver.runtime

    @classmethod
    def from_layers(cls, layers: list[dict], run_dir=None, progress: str = "auto") -> Experiment:
        return cls(resolve(layers), run_dir, progress)

    @classmethod
    def resume(cls, run_dir: str | Path, progress: str = "auto", device: str | None = None, threads: int | None = None,
               stream=None) -> Experiment:
        """Continue the run in ``run_dir`` after its last finished task (on ``device`` / ``threads`` if given;
        ``stream``: the same tasks again, for a run whose data were given in Python).

        The config must be the one the checkpoints were written with (its digest is in each); an
        unreadable checkpoint falls back to the previous one, which is then continued.
        """
        run = RunDir(run_dir)
        if not run.exists():
            raise CilkitError(f"cannot resume: {run.config_path} does not exist (not a cilkit run folder)")
        try:
            raw = run.read_config()
        except Exception as e:
            raise RunFolderError(f"cannot resume: {run.config_path} cannot be read ({type(e).__name__})") from None
        digest = config_digest(raw)
        raw.update({k: v for k, v in {"device": device, "threads": threads}.items() if v is not None})
        exp = cls(check(from_dict(Config, raw)), run_dir, progress, stream=stream)
        exp.resumed, exp.digest = True, digest
        for ckpt in run.checkpoints():
            try:
                state = run.load_checkpoint(ckpt)
            except CheckpointError as e:
                if "not data" in str(e):
                    raise
                log.warning("%s; trying the previous checkpoint", e)
                continue
            if state.get("config_sha256") not in (None, digest):
                raise RunFolderError(
                    f"cannot resume: {run.config_path} is not the config that {ckpt.name} was trained with (edited, or the "
                    f"checkpoint is from another run); restore it, or start a new run with --config {run.config_path}")
            try:
                exp.driver.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"checkpoint {ckpt} does not fit this run's model, method or scenario "
                                      f"({str(e).splitlines()[0]})") from None
            log.info("resuming %s after task %d (%s)", run.path, exp.driver.next_task, ckpt.name)
            break
        return exp

    def resolved_config(self) -> dict:
        """The whole configuration the run uses: every key, the method's hyperparameters with their defaults."""
        out = self.cfg.to_dict()
        out["method_args"] = dataclasses.asdict(self.method.hp)
        ds = self.scenario.dataset
        out["data"]["normalization"] = {"mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std]}
        if self.method.memory is None:  # no budget is used: none is recorded (it would be refused on a rerun)
            out["memory"].update(size=None, per_class=None)
        if self.cfg.data.dataset == "stream":  # the tasks given: their sizes are the scenario
            out["scenario"].update(name=list(self.scenario.increments), class_order="identity")
        if self.cfg.model.init not in INITS:  # the files read, wherever the run is resumed or extended from
            out["model"]["init"] = str(Path(self.cfg.model.init).expanduser().resolve())
        out["data"]["new_classes"] = [str(Path(p).expanduser().resolve()) for p in self.cfg.data.new_classes]
        return out

    def start(self) -> None:
        if self.run.exists() or self.run.metrics_path.exists() or self.run.latest_checkpoint() is not None:
            raise CilkitError(f"run folder {self.run.path} already holds a run: use --resume {self.run.path} or another --run-dir")
        self.run.write_config(self.resolved_config())
        self.digest = config_digest(self.run.read_config())

    def execute(self) -> dict:
        """Train every remaining task; after each, a checkpoint, metrics.json and accuracy.png."""
        self.run.lock()
        try:
            if not self.resumed:
                self.start()
            return self._execute()
        finally:
            self.run.unlock()

    def _execute(self) -> dict:
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        handler = _attach_log(self.run)
        console = None
        if self.progress != "off" and not _has_console(log):  # Python API with progress asked for: show it
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(console)
        try:
            log.info("class order: %s", self.scenario.order)
            log.info("tasks: %s classes", self.scenario.increments)
            log.info("schedule: %s", schedule_text(self.cfg, len(self.scenario.tasks)))
            for task in self.driver.remaining_tasks():
                try:
                    self.driver.run_task(task)
                except TrainingDiverged as e:
                    kept = self.run.latest_checkpoint()
                    raise TrainingDiverged(f"{e}; the run folder keeps {'the checkpoint ' + kept.name if kept else 'no checkpoint'}"
                                           f" ({self.run.path})") from None
                self._save(lambda: self.run.save_checkpoint(task.index, {**self.driver.state_dict(), "config_sha256": self.digest}), task)
                self._save(self._write_results, task)
            if not self.driver.remaining_tasks() and not self.run.metrics_path.exists():
                self._write_results()
            return self.driver.metrics()
        finally:
            log.removeHandler(handler)
            handler.close()
            if console is not None:
                log.removeHandler(console)

    def _save(self, write, task) -> None:
        """Write, or say clearly what could not be written; every file is replaced atomically, so the
        folder keeps its last complete version of each."""
        try:
            write()
        except OSError as e:
            done = f"task {task.index} finished but not saved" if task.index == 0 else (
                f"the run folder keeps the checkpoint of task {task.index - 1}")
            raise CilkitError(f"cannot write to {self.run.path}: {e.strerror or e} ({done}); "
                              f"free the space or fix the folder, then: cilkit run --resume {self.run.path}") from None

    def _write_results(self) -> None:
        metrics = self.driver.metrics()
        self.run.write_metrics(metrics)
        atomic_write_text(self.run.path / "metrics.csv", metrics_csv(metrics))
        if metrics["tasks"]:
            plot_run(metrics, self.run.path / "accuracy.png")


def run(config: dict | Config | str | None = None, run_dir: str | Path | None = None, progress: str = "off", stream=None,
        **overrides) -> dict:
    """Python API: run an experiment and return its metrics.

    ``config`` is a dict of config keys, a :class:`Config`, or a YAML file / preset name;
    ``overrides`` are more config keys (``run(method="finetune", train={"epochs": 3})``).
    ``stream``: the user's own tasks, in order, instead of a dataset (``data.dataset`` becomes ``stream``):
    each ``{"x": images, "y": labels, "class_names": [...]}`` (or ``(x, y)``), a ``torch.utils.data.Dataset``
    of ``(image, label)``, or ``{"train": ..., "test": ...}`` of those; a task without a test part is split
    per class (``data.split_fraction``, ``data.split_seed``). :mod:`cilkit.data.userdata` says what is accepted.
    """
    if isinstance(config, Config):
        if stream is not None:
            config.data.dataset = "stream"
        cfg = check(config)
    else:
        layers = [load_yaml(config)] if isinstance(config, str) else [config or {}]
        layers += [overrides] + ([{"data": {"dataset": "stream"}}] if stream is not None else [])
        cfg = resolve(layers)
    return Experiment(cfg, run_dir, progress, stream=stream).execute()
