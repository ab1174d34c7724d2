"""``cilkit extend RUN --data NEW``: the classes of the user's images as the next task of a finished run.

The new run is the parent's config with the new data appended to ``data.new_classes`` and the parent in
``lineage``: the same method, memory, schedule, seed and class order. Its scenario is rebuilt from that
config (the old images are read again from the run's own dataset, so the indices the memory holds into
them keep their meaning; the new classes take the next labels, their images after the old ones,
brought to the run's image size and channels). The parent's last checkpoint is loaded into the new
run's driver, which then trains only the new task, evaluates every class seen (old ones on their test
sets: the accuracy matrix gains a row) and writes a new run folder; the parent is left as it is. The
new folder starts with the parent's checkpoint (under the new config's digest), so it resumes with
``cilkit run --resume`` and can be extended again.

Everything is checked before the new folder is written: the parent (a cilkit run, finished, its
checkpoint readable), the new data (images, class names not in the run, the run's shape), and whether
the method can grow (a fixed head has no rows left for new classes). Data given in Python (arrays or a
``Dataset``, as a task of :func:`cilkit.run`'s ``stream``) are written into the new run folder as
``new-classes/task_XXX.npz`` so that the run can be resumed and extended from disk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cilkit.config import Config
from cilkit.data.datasets import pad_images
from cilkit.data.userdata import append_task, task_split
from cilkit.errors import CilkitError, ConfigError, DatasetError
from cilkit.experiment import Experiment, build_scenario, check, config_digest
from cilkit.results.rundir import CheckpointError, RunDir, RunFolderError
from cilkit.schema import from_dict

log = logging.getLogger("cilkit")

ALLOWED_OVERRIDES = ("device", "threads")  # how the new task runs, not what it is


def _parent(run_dir: str | Path) -> tuple[RunDir, dict, dict, Path]:
    """The parent run's folder, config, metrics and last checkpoint, or one error saying what it lacks."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunFolderError(f"cannot extend {run.path}: no such folder")
    if not run.exists():
        raise RunFolderError(f"cannot extend {run.path}: not a cilkit run folder (no config.yaml)")
    try:
        raw = run.read_config()
        metrics = run.read_metrics()
    except FileNotFoundError:
        raise RunFolderError(f"cannot extend {run.path}: it has no metrics.json (no task finished yet); finish it first: "
                             f"cilkit run --resume {run.path}") from None
    except Exception as e:  # noqa: BLE001 - YAML or JSON that does not parse
        raise RunFolderError(f"cannot extend {run.path}: its config.yaml or metrics.json cannot be read "
                             f"({type(e).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(metrics, dict):
        raise RunFolderError(f"cannot extend {run.path}: not a cilkit run folder (config.yaml or metrics.json is not a mapping)")
    if not metrics.get("complete"):
        done = len(metrics.get("tasks") or [])
        total = len(metrics.get("increments") or [])
        raise RunFolderError(f"cannot extend {run.path}: the run is not finished ({done} of {total} tasks); finish it first: "
                             f"cilkit run --resume {run.path}")
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise RunFolderError(f"cannot extend {run.path}: it has no checkpoint (checkpoints/task_XXX.pt)")
    return run, raw, metrics, ckpt


def _out_dir(parent: RunDir, given: str | Path | None) -> RunDir:
    if given is not None:
        out = RunDir(given)
    else:  # <parent>-ext1, -ext2, ...: the first that is free
        stem = parent.path.name
        n = 1
        while (parent.path.parent / f"{stem}-ext{n}").exists():
            n += 1
        out = RunDir(parent.path.parent / f"{stem}-ext{n}")
    if out.path.resolve() == parent.path.resolve():
        raise RunFolderError(f"the extended run needs its own folder: {out.path} is the parent run")
    if out.path.exists() and any(out.path.iterdir()):
        raise RunFolderError(f"cannot write the extended run to {out.path}: the folder exists and is not empty; choose another")
    return out


def extend_run(run_dir: str | Path, data, run_dir_out: str | Path | None = None, progress: str = "off", **overrides) -> dict:
    """Train the classes of ``data`` as the next task of the finished run in ``run_dir``, into a new run folder.

    ``data``: a folder of images (``train/<class>/`` + ``test/<class>/``, or ``<class>/``, split per class with
    ``data.split_fraction`` and ``data.split_seed`` of the run), an ``.npz`` of the numpy dataset's form, or a task
    given in Python as for :func:`cilkit.run`'s ``stream`` (arrays ``{"x", "y", "class_names"}``, a Dataset). The
    parent is not changed. ``overrides``: ``device`` and ``threads`` only (the task is trained as the run was).
    Returns the new run's metrics, with ``run_dir`` (the new folder) added.
    """
    unknown = sorted(set(overrides) - set(ALLOWED_OVERRIDES))
    if unknown:
        raise CilkitError(f"extend trains the new classes with the run's own method, memory and schedule; only "
                          f"{', '.join(ALLOWED_OVERRIDES)} may be given, not {', '.join(unknown)}")
    parent, raw, metrics, ckpt = _parent(run_dir)
    if raw.get("data", {}).get("dataset") == "stream":
        raise CilkitError(f"cannot extend {parent.path} from disk: its data were given in Python (a stream), so its old "
                          "classes cannot be read again; run the stream with the new task appended instead")
    out = _out_dir(parent, run_dir_out)
    out.check_writable()
    in_memory = not isinstance(data, (str, os.PathLike))
    new_task = len(metrics.get("increments") or [])
    raw = dict(raw)
    raw_data = dict(raw.get("data") or {})
    if in_memory:
        part = task_split(data, "the new classes", test_fraction=float(raw_data.get("split_fraction", 0.2)),
                          seed=int(raw_data.get("split_seed", 0)))
        entry = (out.path / "new-classes" / f"task_{new_task:03d}.npz").resolve()
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise DatasetError(f"the new data {root} do not exist: expected a folder of images by class "
                               "(train/<class>/ and test/<class>/, or <class>/) or an .npz")
        entry = root.resolve()
    # an in-memory task's file is written once everything is checked: it joins the config after the checks
    raw_data["new_classes"] = list(raw_data.get("new_classes") or []) + ([] if in_memory else [str(entry)])
    raw["data"] = raw_data
    raw["lineage"] = list(raw.get("lineage") or []) + [str(parent.path.resolve())]
    raw["name"] = None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = check(from_dict(Config, raw))
    if cfg.model.head == "fixed":
        raise ConfigError("model.head", f"the run's fixed head has a row for each of its {sum(metrics['increments'])} classes "
                          f"and no room for more, so method '{cfg.method}' cannot grow further; a run to be extended needs "
                          "model.head: growing (start one with --set model.head=growing)")
    scenario = build_scenario(cfg)
    if in_memory:
        scenario = append_task(scenario, pad_images(part, cfg.data.pad), "the new classes")
        cfg.data.new_classes.append(str(entry))
    exp = Experiment(cfg, out.path, progress, scenario=scenario)
    state = _load_parent(parent, ckpt, exp)
    log.info("extending %s (%d tasks) with %d classes (%s) -> %s", parent.path, new_task, scenario.increments[-1],
             ", ".join(scenario.dataset.class_names[-scenario.increments[-1]:]), out.path)
    exp.run.lock()
    try:
        if in_memory:
            _write_npz(entry, part)
        exp.start()  # config.yaml; then the parent's checkpoint under the new config's digest: the run resumes from it
        exp.run.save_checkpoint(new_task - 1, {**state, "config_sha256": exp.digest})
    finally:
        exp.run.unlock()
    exp.resumed = True
    result = exp.execute()
    return {**result, "run_dir": str(exp.run.path)}


def _write_npz(path: Path, part) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, x_train=part.train.images, y_train=part.train.labels, x_test=part.test.images,
                        y_test=part.test.labels, class_names=np.array(part.class_names))
    os.replace(tmp, path)


def _load_parent(parent: RunDir, ckpt: Path, exp: Experiment) -> dict:
    """The parent's last checkpoint, loaded into the new run's driver (the finished tasks' structure, weights, memory,
    records and RNG); a checkpoint that does not fit the grown scenario says why."""
    state = parent.load_checkpoint(ckpt)
    digest = config_digest(parent.read_config())
    if state.get("config_sha256") not in (None, digest):
        raise RunFolderError(f"cannot extend {parent.path}: its config.yaml is not the config that {ckpt.name} was trained "
                             "with (edited, or the checkpoint is from another run)")
    n_tasks = len(exp.scenario.tasks) - 1
    if state.get("next_task") != n_tasks:
        raise RunFolderError(f"cannot extend {parent.path}: its last checkpoint {ckpt.name} is after task "
                             f"{state.get('next_task')}, not after its last task {n_tasks}; finish it first: "
                             f"cilkit run --resume {parent.path}")
    try:
        exp.driver.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"method '{exp.cfg.method}' cannot grow the run {parent.path} by a task: its checkpoint "
                              f"{ckpt.name} does not fit the grown model ({str(e).splitlines()[0]})") from None
    return state
