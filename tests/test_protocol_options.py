"""The online papers' protocol options: data.pad, data.normalization: none, train.keep_optimizer."""

from __future__ import annotations

import contextlib
import json
import types

import numpy as np
import pytest
import torch
import yaml

import cilkit
from cilkit.data.datasets import Dataset, ImageSet, channel_stats, pad_images
from cilkit.errors import ConfigError
from cilkit.experiment import build_scenario
from cilkit.training.context import TrainingContext
from cilkit.training.loop import fit
from cilkit.training.stage import OptimizerState, Stage

FAST = {"method": "finetune", "model": {"backbone": "mlp", "hidden": [32]}, "train": {"epochs": 1, "batch_size": 64},
        "scenario": {"name": "B6-Inc4"}}


def _layer(**over) -> dict:
    layer = json.loads(json.dumps(FAST))
    for k, v in over.items():
        layer[k] = {**layer.get(k, {}), **v} if isinstance(v, dict) else v
    return layer


# -- data.pad ------------------------------------------------------------------------------------


def test_pad_grows_every_image_by_zero_borders_and_recomputes_computed_statistics():
    plain = build_scenario(cilkit.resolve([_layer()])).dataset
    padded = build_scenario(cilkit.resolve([_layer(data={"pad": 2})])).dataset
    assert padded.image_shape == (1, 12, 12) and plain.image_shape == (1, 8, 8)
    for a, b in ((plain.train, padded.train), (plain.test, padded.test)):
        assert b.images.shape == (len(a), 12, 12, 1)
        assert np.array_equal(b.images[:, 2:-2, 2:-2], a.images) and np.array_equal(b.labels, a.labels)
        border = np.ones((12, 12), bool)
        border[2:-2, 2:-2] = False
        assert not b.images[:, border].any()
    # the statistics count the zero borders: the mean shrinks by 64/144
    assert padded.mean == channel_stats(padded.train.images)[0] and padded.std == channel_stats(padded.train.images)[1]
    assert padded.mean[0] == pytest.approx(plain.mean[0] * 64 / 144)


def test_pad_keeps_published_statistics_and_a_given_normalization():
    images = np.full((2, 4, 4, 3), 200, np.uint8)
    ds = Dataset("toy", ImageSet(images, [0, 1]), ImageSet(images, [0, 1]), ["a", "b"], (0.5,) * 3, (0.25,) * 3)
    padded = pad_images(ds, 1)
    assert padded.image_shape == (3, 6, 6) and padded.mean == (0.5,) * 3 and padded.std == (0.25,) * 3
    assert pad_images(ds, 0) is ds
    given = build_scenario(cilkit.resolve([_layer(data={"pad": 1, "normalization": {"mean": [0.3], "std": [0.2]}})])).dataset
    assert given.image_shape == (1, 10, 10) and given.mean == (0.3,) and given.std == (0.2,)


def test_a_digits_run_with_pad_2_records_the_normalisation_it_used(tmp_path):
    metrics = cilkit.run(_layer(data={"pad": 2}, model={"backbone": "convnet", "hidden": None}), run_dir=tmp_path / "r")
    assert metrics["complete"] and len(metrics["tasks"]) == 2
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    padded = build_scenario(cilkit.resolve([_layer(data={"pad": 2})])).dataset
    assert saved["data"]["pad"] == 2
    assert saved["data"]["normalization"] == metrics["normalization"] == {"mean": list(padded.mean), "std": list(padded.std)}


def test_a_negative_pad_is_refused():
    with pytest.raises(ConfigError, match=r"'data.pad'.*>= 0"):
        cilkit.resolve([_layer(data={"pad": -1})])


# -- data.normalization: none ----------------------------------------------------------------------


def test_normalization_none_only_scales_to_0_1(tmp_path):
    exp = cilkit.Experiment(cilkit.resolve([_layer(data={"normalization": "none"})]), tmp_path / "r", progress="off")
    rt = exp.runtime
    assert rt.augment.mean == (0.0,) and rt.augment.std == (1.0,)
    idx = torch.arange(50)
    raw, _ = rt.train_data.batch(idx)
    x, _ = rt.train_batch(idx, augment=False)
    torch.testing.assert_close(x, raw.float() / 255, rtol=1e-6, atol=0)
    test_idx = torch.arange(len(rt.test_data))
    (x_test, _), *_ = rt.test_batches(rt.test_data, test_idx)
    torch.testing.assert_close(x_test, rt.test_data.batch(test_idx[: len(x_test)])[0].float() / 255, rtol=1e-6, atol=0)
    assert exp.resolved_config()["data"]["normalization"] == {"mean": [0.0], "std": [1.0]}


@pytest.mark.parametrize("value", ["None", "zscore", 5])
def test_another_normalization_word_is_refused_naming_what_is_allowed(value):
    with pytest.raises(ConfigError, match=r"config error in 'data.normalization'.*none.*null.*mean"):
        cilkit.resolve([_layer(data={"normalization": value})])


# -- train.keep_optimizer ---------------------------------------------------------------------------


class _Runtime:
    """Just what the loop reads: batches of a constant input, no autocast."""

    device = torch.device("cpu")

    def train_batch(self, idx, augment=True):
        return torch.ones(len(idx), 1), torch.zeros(len(idx), dtype=torch.long)

    def autocast(self):
        return contextlib.nullcontext()


def _linear_fit(params, steps: int, state: OptimizerState | None, optimizer: str = "adam") -> None:
    """``steps`` steps of the loss sum_p <p, 1>: every gradient is 1, so Adam's moments after n steps are
    known: exp_avg = 1 - 0.9^n, exp_avg_sq = 1 - 0.999^n."""
    stage = Stage(epochs=1, lr=1e-3, weight_decay=0.0, optimizer=optimizer, schedule="constant", batch_size=1)
    loss = lambda x, y: sum(p.sum() for p in params) + 0 * x.sum()  # noqa: E731
    fit(_Runtime(), [{"params": params}], torch.arange(steps), stage, loss, batches=lambda idx, b: list(idx.split(b)),
        optimizer_state=state)


def _adam_state(state: OptimizerState, p) -> tuple[float, float, float]:
    s = state.state[p]
    return float(s["step"]), float(s["exp_avg"][0]), float(s["exp_avg_sq"][0])


def test_the_next_main_stage_continues_adams_moments_and_step_count():
    old = torch.nn.Parameter(torch.zeros(3))
    net = types.SimpleNamespace(params=[old])
    state = OptimizerState(lambda: net.params)
    _linear_fit([old], 4, state)
    assert _adam_state(state, old) == pytest.approx((4, 1 - 0.9**4, 1 - 0.999**4))
    new = torch.nn.Parameter(torch.zeros(2))  # a parameter added by the next task starts fresh
    net.params = [old, new]
    _linear_fit([old, new], 3, state)
    assert _adam_state(state, old) == pytest.approx((7, 1 - 0.9**7, 1 - 0.999**7))
    assert _adam_state(state, new) == pytest.approx((3, 1 - 0.9**3, 1 - 0.999**3))
    fresh = OptimizerState(lambda: net.params)
    _linear_fit([old, new], 3, fresh)  # a fresh carrier: what every stage gets without keep_optimizer
    assert _adam_state(fresh, old) == pytest.approx((3, 1 - 0.9**3, 1 - 0.999**3))


def test_only_the_networks_parameters_are_kept_and_another_optimizer_starts_fresh():
    p, outside = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    state = OptimizerState(lambda: [p])
    _linear_fit([p, outside], 2, state, optimizer="sgd")
    assert set(state.state) == {p} and state.kind == "SGD"
    assert torch.equal(state.state[p]["momentum_buffer"], torch.ones(3) * (1 + 0.9))
    _linear_fit([p], 2, state, optimizer="adam")  # SGD's momentum is no Adam moment
    assert state.kind == "Adam" and _adam_state(state, p) == pytest.approx((2, 1 - 0.9**2, 1 - 0.999**2))


def test_the_context_passes_the_kept_state_to_the_main_stage_only():
    p = torch.nn.Parameter(torch.zeros(3))
    state = OptimizerState(lambda: [p])
    ctx = TrainingContext(_Runtime(), None, 0, lambda t: None, optimizer_state=state)
    stage = Stage(epochs=1, lr=1e-3, weight_decay=0.0, optimizer="adam", schedule="constant", batch_size=1)
    loss = lambda x, y: p.sum() + 0 * x.sum()  # noqa: E731
    hooks = {"batches": lambda idx, b: list(idx.split(b)), "train_mode": lambda: None, "after_step": lambda: None}
    ctx.fit([{"params": [p]}], torch.arange(4), stage, loss, main=True, **hooks)
    ctx.fit([{"params": [p]}], torch.arange(5), stage, loss, **hooks)  # an extra stage: fresh, and not kept
    assert _adam_state(state, p)[0] == 4
    ctx.fit([{"params": [p]}], torch.arange(2), stage, loss, main=True, **hooks)
    assert _adam_state(state, p)[0] == 6


def test_a_run_with_keep_optimizer_carries_the_state_from_task_to_task(tmp_path, monkeypatch):
    steps, original = [], TrainingContext.fit

    def counting(self, *args, main=False, **hooks):
        out = original(self, *args, main=main, **hooks)
        if main:
            steps.append(self.at.steps)
        return out

    monkeypatch.setattr(TrainingContext, "fit", counting)
    train = {"optimizer": "adam", "lr": 1e-3, "keep_optimizer": True}
    exp = cilkit.Experiment(cilkit.resolve([_layer(train=train)]), tmp_path / "r", progress="off")
    exp.execute()
    state, net = exp.driver.optimizer_state, exp.driver.net
    first_layer, new_block = next(net.backbone.parameters()), net.head.blocks[1].weight
    assert len(steps) == 2 and state.kind == "Adam"
    assert float(state.state[first_layer]["step"]) == steps[0] + steps[1]  # continued over both tasks
    assert float(state.state[new_block]["step"]) == steps[1]  # the second task's head started fresh
    plain = cilkit.Experiment(cilkit.resolve([_layer(train={**train, "keep_optimizer": False})]), tmp_path / "p", progress="off")
    assert plain.driver.optimizer_state is None and plain.driver.method.ctx.optimizer_state is None


def test_resume_with_keep_optimizer_equals_the_uninterrupted_run(run_cut_and_resumed, tmp_path):
    train = {"optimizer": "adam", "lr": 1e-3, "keep_optimizer": True}
    cfg = cilkit.resolve([_layer(train=train, scenario={"name": "B4-Inc3"})])
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=1)
    assert len(partial["tasks"]) == 1 and len(full["tasks"]) == 3

    def figures(m):
        drop = {"wall_time_s", "train_seconds", "train_images_per_s", "phase_seconds"}
        return [{k: v for k, v in t.items() if k not in drop} for t in m["tasks"]], m["accuracy_matrix"]

    assert figures(resumed) == figures(full)
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_002.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "task_002.pt", weights_only=True)
    assert a["net"].keys() == b["net"].keys() and all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])) for k, v in s.items())
