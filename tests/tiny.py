"""What the method tests share: tiny configs on the embedded digits, a smoke run with a floor, the
set-up of a task as the driver does it, and a fake Context for hand-made unit tests."""

from __future__ import annotations

import io
import math
import types
from functools import lru_cache

import torch

import cilkit
from cilkit.config import Config
from cilkit.driver import TaskDriver
from cilkit.experiment import Experiment, build_driver, build_scenario
from cilkit.methods import METHODS
from cilkit.training.loop import StepInfo, shuffled_batches
from cilkit.training.stage import Stage

TINY = {"model": {"backbone": "mlp", "hidden": [64]}, "train": {"epochs": 2}, "memory": {"size": 60}}
SMALL_CONVNET = {"backbone": "convnet", "widths": [8, 16]}  # has BatchNorm, for tests on its statistics

# The smoke run: two tasks of five digits, two epochs, a small convnet. Every working method reaches the
# floor on the better of its CNN and NME heads (measured: 72-94 % after the first task, 45-72 % at the end);
# one that is broken (NaN losses, constant predictions) stays near chance, 20 % and 10 %.
SMOKE = {"scenario": {"name": "B0-Inc5"}, "model": SMALL_CONVNET, "train": {"epochs": 2, "batch_size": 32}}
SMOKE_FLOOR = (60.0, 25.0)  # best-head top-1 after the first task, and at the end
# Method arguments of the smoke run where a paper default is too heavy for it: ACIL's and DS-AL's 8192-wide buffer
# puts a 512 MiB float64 matrix per stream in every task's checkpoint.
# PASS's weights 10 (with T 0.1) were tuned with Adam, its paper's optimizer: under the smoke run's SGD the second task
# collapses onto its new classes (measured 11.7 % at the end; 45.6 with both weights 1).
SMOKE_ARGS = {"acil": {"buffer_size": 512}, "ds-al": {"buffer_size": 512}, "gdumb": {"epochs": 32},  # the defaults cost minutes here
              "pass": {"lambda_proto": 1.0, "lambda_kd": 1.0},
              "foster": {"compression_epochs": 2},  # FOSTER's 130 compression epochs (CIFAR) would dwarf the 2 of training
              "beef": {"fusion_epochs": 2, "sgld_steps": 1}}  # BEEF's 60 fusion epochs and 3 Langevin steps a step


def tiny_cfg(method: str, method_args: dict | None = None, **sections) -> Config:
    """The tiny config for ``method``; ``sections`` replace whole top-level sections (``model=SMALL_CONVNET``)."""
    layer = {**TINY, "method": method, "method_args": method_args or {}, **sections}
    if METHODS[method].memory_use == "none":
        layer.pop("memory", None)
    return cilkit.resolve([layer])


@lru_cache(maxsize=4)
def _scenario(scenario_name: str):
    return build_scenario(cilkit.resolve([{"scenario": {"name": scenario_name}}]))


def tiny_driver(method: str, method_args: dict | None = None, **sections) -> TaskDriver:
    """A driver for the tiny config on the (cached) digits scenario, without a run folder."""
    cfg = tiny_cfg(method, method_args, **sections)
    return build_driver(cfg, _scenario(str(cfg.scenario.name)), progress="off")


def open_task(driver: TaskDriver, index: int):
    """Start task ``index`` as the driver does, up to and including ``before_task``; returns the task."""
    task = driver.scenario.tasks[index]
    driver.open_task(task)
    return task


def smoke_run(tmp_path, method: str, method_args: dict | None = None) -> tuple[dict, Experiment]:
    """The smoke run of ``method``; returns its metrics and the experiment."""
    layer = {**SMOKE, "method": method, "method_args": method_args or SMOKE_ARGS.get(method, {})}
    if METHODS[method].memory_use == "required":
        layer["memory"] = {"size": 60}
    exp = Experiment(cilkit.resolve([layer]), tmp_path / f"smoke-{method}", progress="off")
    return exp.execute(), exp


def best_head(task_record: dict) -> float:
    return max(task_record["cnn"]["top1"], task_record.get("nme", {}).get("top1", 0.0))


def assert_complete_run(metrics: dict, n_tasks: int = 2, floor: tuple[float, float] = SMOKE_FLOOR, nme: bool | None = None):
    """A finished run with finite figures, the NME head where expected, and accuracy above the floor."""
    assert metrics["complete"] and len(metrics["tasks"]) == n_tasks
    for key, value in metrics["summary"].items():
        assert math.isfinite(value), key
    if nme is not None:
        assert ("nme_last_accuracy" in metrics["summary"]) == nme
    first, last = best_head(metrics["tasks"][0]), best_head(metrics["tasks"][-1])
    assert first >= floor[0], f"first task {first:.1f} < {floor[0]}"
    assert last >= floor[1], f"last task {last:.1f} < {floor[1]}"


class FakeContext:
    """A :class:`cilkit.methods.base.Context` for unit tests: records ``fit`` calls, no real data needed.

    ``train_data`` may be any object with what the method reads (``indices_of``, ``labels``);
    ``fit`` may be replaced by a callable ``fit(groups, indices, stage, loss, **hooks) -> dict``.
    """

    def __init__(self, stage: Stage | None = None, train_data=None, memory=None, seed: int = 0, fit=None, features=None):
        self.device = torch.device("cpu")
        self.seed = seed
        self.memory = memory
        self.at = StepInfo()
        self.train_data = train_data or types.SimpleNamespace(indices_of=lambda classes: torch.arange(0))
        self._stage = stage or Stage(epochs=1, lr=0.1)
        self._fit = fit
        self._features = features
        self.fits: list[dict] = []

    def stage(self, task) -> Stage:
        return self._stage

    def fit(self, groups, indices, stage, loss, *, batches=shuffled_batches, train_mode=lambda: None,
            after_step=lambda: None, before_step=lambda: None, desc="", main=False):
        call = {"groups": groups, "indices": indices, "stage": stage, "loss": loss, "batches": batches,
                "train_mode": train_mode, "after_step": after_step, "before_step": before_step, "desc": desc,
                "main": main}
        self.fits.append(call)
        return self._fit(**call) if self._fit is not None else {"images": 0, "seconds": 0.0, "images_per_s": 0.0}

    def features(self, indices, forward, *, flip=False, transform=None):
        if self._features is None:
            raise AssertionError("this test's FakeContext has no features")
        return self._features(indices, forward, flip=flip, transform=transform)


class FixedLogits(torch.nn.Module):
    """A stand-in network (or teacher) whose logits are given by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return {"logits": self.logits}


class LinearNet(torch.nn.Module):
    """A network whose logits are a linear map of the input (a hand-made stand-in), seeded."""

    def __init__(self, d: int = 3, c: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(d, c)

    def forward(self, x):
        return {"logits": self.fc(x)}


def reload_through_weights_only(method, fresh):
    """``fresh`` after loading ``method``'s state saved with torch.save and read back with weights_only=True
    (a state that is not plain tensors and types fails here)."""
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh
