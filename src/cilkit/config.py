"""Experiment configuration: the typed sections, the datasets' profiles and the checks that need no data.

Every key is checked against the dataclasses below (:func:`cilkit.schema.from_dict`); a wrong key,
type or value raises :class:`ConfigError` naming the dotted field and what is allowed. Layers and
presets are merged in :mod:`cilkit.presets`; the method's own settings are checked by the method
(:meth:`cilkit.methods.base.Method.validate`) when the experiment resolves a config. This module
knows no method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cilkit.data.augment import AUGMENTATIONS
from cilkit.data.registry import DATASETS
from cilkit.errors import ConfigError
from cilkit.memory.exemplars import SELECTIONS
from cilkit.memory.stream import STREAM_RULES
from cilkit.models.backbones import BACKBONES
from cilkit.models.network import HEADS, INITS
from cilkit.schema import param
from cilkit.training.stage import Stage

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    n_classes: int | None = param(None, ge=1)  # keep only the first K classes of the order
    image_size: int | None = None  # imagefolder: decoded images are resized to this size
    on_device: bool | None = None  # keep the uint8 images on the training device (None/auto: when they fit)
    cache_dir: str | None = None  # decoded-image cache (imagefolder, tinyimagenet); None: $CILKIT_CACHE or next to the data
    # per-channel {mean: [...], std: [...]} in [0, 1] units; None: computed from the training images; "none":
    # no normalisation (mean 0, std 1: the images only scaled to [0, 1]); the one used is recorded here in
    # the run folder's config.yaml
    normalization: dict | str | None = None
    # zero-pad every image (train and test) by this many pixels on each side once it is loaded (MNIST's 28 -> 32
    # for a ResNet); statistics computed from the training images count the borders
    pad: int = param(0, ge=0)
    # folders of the user's images (train/<class>/ + test/<class>/, or a plain <class>/ tree) or .npz files (as
    # dataset numpy) whose classes come after the scenario's, one task each, in this order, with the next labels:
    # what `cilkit extend` records. Images are brought to the dataset's size and channels.
    new_classes: list[str] = field(default_factory=list)
    # a plain <class>/ tree of new_classes, or a stream task given without a test part: the share of each class's
    # images kept for testing, drawn with split_seed
    split_fraction: float = param(0.2, gt=0, lt=1)
    split_seed: int = param(0, ge=0, le=SEED_MAX)


@dataclass
class ScenarioConfig:
    name: str | list[int] = "B0-Inc2"
    class_order: str | list[int] = "seed"
    order_seed: int = param(1993, ge=0, le=SEED_MAX)
    # offline: each task trains for train.epochs over its data (the default); online: each task's data is a
    # stream seen once (one epoch, batches of 10 by default: ONLINE_PROFILE), a stream memory taking it in
    mode: str = "offline"


@dataclass
class ModelConfig:
    backbone: str = "convnet"
    hidden: list[int] | None = None  # mlp widths
    widths: list[int] | None = None  # convnet widths
    # growing: the classifier gains a block of rows per task (the logits span the seen classes); fixed: one
    # row per class of the scenario from the first task (the online-CIL papers' single head: every step's
    # cross-entropy runs over all of them); auto: the method's own (fixed for Dark Experience Replay, whose
    # stored logits span every class; growing for the others); the evaluation takes the seen classes' logits
    head: str = "auto"
    # torch: PyTorch's default initialisation; xavier: Mammoth's, on every nn.Linear (weights U(-a, a),
    # a = sqrt(6 / (fan_in + fan_out)), biases 0; convolutions keep theirs); or the path of a PyTorch state_dict of
    # the backbone (a team's own model, loaded with weights_only=True), optionally with its linear classifier
    # (cilkit.models.init_weights names the key forms), which then becomes the first task's rows
    init: str = "torch"
    # with model.init a path: train (the first task trains from the loaded weights), keep (the loaded classifier is the
    # first task as it is: no training in the first task; the file must hold a classifier of the first task's size)
    init_first: str = "train"


@dataclass
class TrainConfig:
    epochs: int = 10
    first_epochs: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.1
    first_lr: float | None = None
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(5e-4, ge=0)
    first_weight_decay: float | None = param(None, ge=0)
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    first_milestones: list[int] | None = None
    gamma: float = param(0.1, gt=0)
    batch_size: int = 128
    augment: str = "none"
    crop_pad: int = param(4, ge=0)
    amp: bool | None = None  # bf16 autocast (None/auto: on CUDA)
    channels_last: bool | None = None  # (None/auto: on CUDA)
    compile: bool = False  # torch.compile the backbone (fewer, fused kernels; compiles once per run)
    # carry the optimizer's state of every parameter (momentum buffers, Adam's moments and step count) from one
    # task's main training into the next one's (new parameters start fresh); extra stages always start fresh
    keep_optimizer: bool = False

    def stage(self, task: int) -> Stage:
        """The stage of task index ``task``; the ``first_*`` settings apply to task 0 when given."""

        def pick(name: str):
            value = getattr(self, f"first_{name}") if task == 0 else None
            return getattr(self, name) if value is None else value

        return Stage(
            epochs=pick("epochs"), lr=pick("lr"), weight_decay=pick("weight_decay"), momentum=self.momentum,
            optimizer=self.optimizer, schedule=self.schedule, milestones=list(pick("milestones")),
            gamma=self.gamma, batch_size=self.batch_size,
        )


@dataclass
class MemoryConfig:
    size: int | None = 2000  # fixed total budget shared by all seen classes
    per_class: int | None = None  # or a fixed number per class (then size is ignored)
    # auto: the method's own (herding for most; reservoir for ER and Dark Experience Replay; balanced for
    # GDumb); herding / random select a task's exemplars after it; reservoir / balanced fill the memory as
    # the stream passes (cilkit.memory.stream)
    selection: str = "auto"
    # repeat the exemplars in each task's training set to this ratio of old to new samples (None: each once)
    replay_ratio: float | None = param(None, gt=0)
    nme_flip: bool | None = None  # flip exemplars for the class means (None/auto: when training flips)


@dataclass
class EvalConfig:
    # None: 1024 on a GPU, 128 on the CPU, where a convolution's forward is about 3x slower per image at
    # 1024 than at 128 (benchmarks and docs/results.md, "Time outside training")
    batch_size: int | None = None
    topk: int = 5


@dataclass
class Config:
    method: str = "replay"
    method_args: dict = field(default_factory=dict)
    seed: int = param(0, ge=0, le=SEED_MAX)
    device: str = "auto"
    threads: int | None = param(None, ge=1)  # CPU threads of torch (None: torch's default, one per core)
    name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the run folders this run was extended from (`cilkit extend`), oldest first: their tasks are its first tasks
    lineage: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "multistep", "constant", "sgdr")  # training.stage.lr_factor
DEVICES = ("auto", "cpu", "cuda", "mps")
MODES = ("offline", "online")
NO_NORMALIZATION = "none"  # data.normalization: the images only scaled to [0, 1]

# The online setting's defaults, under the user's own values (Mammoth's Seq-MNIST: batch 10, a constant
# rate; Chaudhry et al. 2019: one pass, batch 10): merged over the dataset's profile when scenario.mode is online.
ONLINE_PROFILE: dict = {
    "train": {"epochs": 1, "first_epochs": None, "batch_size": 10, "schedule": "constant", "milestones": [],
              "first_milestones": None},
}

# What suits each dataset when the user does not say otherwise.
DATASET_PROFILES: dict[str, dict] = {
    "digits": {
        "scenario": {"name": "B0-Inc2"},
        "model": {"backbone": "convnet"},
        "memory": {"size": 200},
        "train": {"epochs": 12, "lr": 0.05, "batch_size": 32, "schedule": "cosine", "augment": "none"},
    },
    **{
        name: {
            "scenario": {"name": "B0-Inc2"},
            "model": {"backbone": "convnet"},
            "train": {"epochs": 2, "lr": 0.1, "batch_size": 128, "schedule": "cosine", "augment": "none"},
        }
        for name in ("mnist", "fashion-mnist")
    },
    # CIFAR and Tiny-ImageNet: PyCIL's replay schedule on ResNet-32 (docs/protocols.md).
    **{
        name: {
            "scenario": {"name": "B0-Inc10"},
            "model": {"backbone": "resnet32"},
            "train": {
                "first_epochs": 200, "first_milestones": [60, 120, 170], "epochs": 70, "milestones": [30, 50],
                "schedule": "multistep", "lr": 0.1, "weight_decay": 2e-4, "first_weight_decay": 5e-4,
                "batch_size": 128, "augment": "crop_flip",
            },
        }
        for name in ("cifar10", "cifar100", "tinyimagenet")
    },
    # A user's own arrays: the plain built-in defaults (convnet, one schedule for every task, no
    # augmentation), nothing inherited from a benchmark.
    "numpy": {},
    "stream": {},  # tasks given in Python: the same plain defaults
    # ImageNet-100 style data: ResNet-18, 90 epochs (UCIR's ImageNet schedule); the images keep their
    # own size when they share one (data.image_size resizes them).
    "imagefolder": {
        "scenario": {"name": "B0-Inc10"},
        "model": {"backbone": "resnet18"},
        "train": {
            "epochs": 90, "milestones": [30, 60], "schedule": "multistep", "lr": 0.1, "weight_decay": 1e-4,
            "batch_size": 128, "augment": "resized_crop_flip",
        },
    },
}
DATASET_ALIASES = {"fmnist": "fashion-mnist", "tiny-imagenet": "tinyimagenet", "tin": "tinyimagenet"}


def validate(cfg: Config) -> None:
    """Checks that need no data: names, ranges and choices. Data-dependent checks come later."""

    def choice(path: str, value: str, allowed) -> None:
        if value not in allowed:
            raise ConfigError(path, f"'{value}' is not allowed; choose one of: {', '.join(allowed)}")

    def positive(path: str, value, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(path, f"must be a positive number, got {value}")

    choice("data.dataset", cfg.data.dataset, sorted(DATASETS))
    choice("model.backbone", cfg.model.backbone, sorted(BACKBONES))
    choice("model.head", cfg.model.head, ("auto", *HEADS))
    if cfg.model.init not in INITS:
        path = Path(cfg.model.init).expanduser()
        if not path.is_file():
            raise ConfigError("model.init", f"'{cfg.model.init}' is not allowed; choose one of: {', '.join(INITS)}, or the "
                              "path of an existing file (a PyTorch state_dict of the backbone)")
    choice("model.init_first", cfg.model.init_first, ("train", "keep"))
    if cfg.model.init_first == "keep" and cfg.model.init in INITS:
        raise ConfigError("model.init_first", "keep needs model.init to be the path of a trained model's state_dict")
    for i, root in enumerate(cfg.data.new_classes):
        if not Path(root).expanduser().exists():
            raise ConfigError(f"data.new_classes[{i}]", f"'{root}' does not exist (a folder of images by class, or an .npz)")
    for key, owner in (("widths", "convnet"), ("hidden", "mlp")):
        if getattr(cfg.model, key) is not None and cfg.model.backbone != owner:
            raise ConfigError(f"model.{key}", f"only the {owner} backbone has {key}; '{cfg.model.backbone}' would ignore it: remove it")
    choice("device", cfg.device, DEVICES)
    choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    choice("train.schedule", cfg.train.schedule, SCHEDULES)
    choice("train.augment", cfg.train.augment, AUGMENTATIONS)
    choice("memory.selection", cfg.memory.selection, ("auto", *SELECTIONS, *STREAM_RULES))
    choice("scenario.mode", cfg.scenario.mode, MODES)
    if cfg.scenario.mode == "online":
        for name in ("epochs", "first_epochs"):
            if getattr(cfg.train, name) not in (None, 1):
                raise ConfigError(f"train.{name}", f"the online setting sees each sample once: must be 1, got {getattr(cfg.train, name)}")
    if cfg.memory.selection in STREAM_RULES and cfg.memory.per_class is not None:
        raise ConfigError("memory.per_class", f"a {cfg.memory.selection} memory has a total capacity: set memory.size instead")
    for name in ("epochs", "batch_size", "lr"):
        positive(f"train.{name}", getattr(cfg.train, name))
    for name in ("first_epochs", "first_lr"):
        positive(f"train.{name}", getattr(cfg.train, name), allow_none=True)
    positive("eval.batch_size", cfg.eval.batch_size, allow_none=True)
    positive("eval.topk", cfg.eval.topk)
    positive("data.image_size", cfg.data.image_size, allow_none=True)
    if isinstance(cfg.data.normalization, str) and cfg.data.normalization != NO_NORMALIZATION:
        raise ConfigError("data.normalization", f"'{cfg.data.normalization}' is not allowed; give none (no normalisation), "
                          "null (computed from the training images) or a mapping {mean: [...], std: [...]}")
    if cfg.name is not None and (not cfg.name.strip() or any(c in cfg.name for c in "/\\") or cfg.name in (".", "..")):
        raise ConfigError("name", f"{cfg.name!r} is a run name, not a path: use letters, digits, - and _ (choose a folder with --run-dir)")
    for name in ("milestones", "first_milestones"):
        ms = getattr(cfg.train, name)
        if ms is not None and (any(m <= 0 for m in ms) or list(ms) != sorted(ms)):
            raise ConfigError(f"train.{name}", f"must be increasing positive epochs, got {ms}")
    spec = DATASETS[cfg.data.dataset]
    if spec.needs_root and not cfg.data.root:
        raise ConfigError("data.root", f"dataset '{cfg.data.dataset}' needs --data-root: {spec.layout}")
    if spec.needs_root and not cfg.data.download and not Path(cfg.data.root).expanduser().exists():
        raise ConfigError("data.root", f"'{cfg.data.root}' does not exist; dataset '{cfg.data.dataset}' expects {spec.layout}")
