"""GDumb: the greedy class-balanced sampler (balance, capacity, uniform eviction, a seeded shuffled stream),
the re-initialisation at every task, training on the memory alone with GDumb's own schedule (SGDR against
the official code's), clipping, CutMix, the test-time mask, the config checks, digits runs against
finetune offline and online, and a resumed run. (Its smoke run is also tests/test_methods_smoke.py's.)"""

from __future__ import annotations

import json
import types

import pytest
import torch
from tiny import SMALL_CONVNET, SMOKE, FakeContext, open_task, tiny_cfg, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.experiment import Experiment
from cilkit.memory.stream import StreamMemory
from cilkit.methods import METHODS
from cilkit.methods.gdumb import GDumb, cutmix
from cilkit.models.network import build_network
from cilkit.presets import load_yaml
from cilkit.training.stage import Stage, lr_factor

FAST = {"epochs": 2}  # two passes over the memory: enough for the mechanics


def counts(mem) -> list[int]:
    return sorted(len(v) for v in mem.exemplars.values())


# -- the sampler --------------------------------------------------------------------------------------


def _unbalanced_stream(seed: int = 0):
    """Five tasks of two classes with unequal sizes (30 to 160 samples), each task's samples shuffled."""
    g = torch.Generator().manual_seed(seed)
    sizes = [160, 40, 90, 30, 120, 60, 35, 150, 45, 70]
    start, tasks = 0, []
    for t in range(5):
        labels = torch.cat([torch.full((sizes[c],), c) for c in (2 * t, 2 * t + 1)])
        order = torch.randperm(len(labels), generator=g)
        tasks.append((torch.arange(start, start + len(labels))[order], labels[order]))
        start += len(labels)
    return tasks


def test_balanced_memory_stays_within_one_across_classes_and_never_exceeds_capacity():
    torch.manual_seed(0)
    for K in (40, 57):  # every class has at least K // 2 samples (30)
        mem = StreamMemory(K, "balanced")
        for t, (idx, y) in enumerate(_unbalanced_stream()):
            for chunk in range(0, len(idx), 7):  # offered in batches, capacity checked after each
                mem.observe(idx[chunk : chunk + 7], y[chunk : chunk + 7])
                assert len(mem) <= K and (mem.slots[: len(mem)] >= 0).all()
            n_seen = 2 * (t + 1)
            c = counts(mem)
            assert len(c) == n_seen and len(mem) == K  # every class has at least K // n_seen >= 4 samples
            assert c[-1] - c[0] <= 1, (K, t, c)
            assert c[0] == K // n_seen
    # a class with less data than its share keeps all of it, and the memory stays full
    mem = StreamMemory(100, "balanced")
    idx, y = _unbalanced_stream()[0]  # 160 of class 0, 40 of class 1
    mem.observe(idx, y)
    assert {c: len(v) for c, v in mem.exemplars.items()} == {0: 60, 1: 40}


def test_a_reservoir_memory_fails_the_balance_check():
    """The check has power: reservoir sampling keeps classes in proportion to their data."""
    torch.manual_seed(0)
    mem = StreamMemory(100, "reservoir")
    for idx, y in _unbalanced_stream():
        mem.observe(idx, y)
    c = counts(mem)
    assert len(mem) == 100 and c[-1] - c[0] > 1


def _survival(trials: int = 400) -> torch.Tensor:
    """How often each of the 20 samples of class 0 (which filled a memory of 20) survives the arrival of
    class 1, which takes half the slots: 1/2 for each under the rule's uniform choice of victims."""
    torch.manual_seed(0)
    kept = torch.zeros(20)
    for _ in range(trials):
        mem = StreamMemory(20, "balanced")
        mem.observe(torch.arange(20), torch.zeros(20, dtype=torch.long))
        mem.observe(torch.arange(20, 60), torch.ones(40, dtype=torch.long))
        assert counts(mem) == [10, 10]
        kept[mem.exemplars[0]] += 1
    return kept / trials


def test_the_sampler_evicts_a_uniformly_drawn_sample_of_the_largest_class():
    se = (0.25 / 400) ** 0.5
    assert torch.all((_survival() - 0.5).abs() < 4 * se)


def test_a_wrong_victim_rule_fails_the_same_check(monkeypatch):
    """The check has power: a rule that always evicts the class's earliest sample keeps the last ten."""
    monkeypatch.setattr(torch, "randint", lambda high, size, **kw: torch.zeros(size, dtype=torch.long))
    se = (0.25 / 400) ** 0.5
    assert not torch.all((_survival() - 0.5).abs() < 4 * se)


# -- GDumb's own stream: the task's samples in a seeded random order ----------------------------------------


def _fake_gdumb(seed: int, capacity: int = 40, cls=GDumb, n_per_class: int = 100):
    """GDumb on a fake store of 4 classes of ``n_per_class`` samples (class c: indices c*n .. (c+1)*n - 1)."""
    labels = torch.arange(4).repeat_interleave(n_per_class)
    data = types.SimpleNamespace(labels=labels,
                                 indices_of=lambda classes: torch.nonzero(torch.isin(labels, torch.tensor(list(classes))))[:, 0])
    ctx = FakeContext(train_data=data, memory=StreamMemory(capacity, "balanced"), seed=seed)
    net = build_network("mlp", (1, 2, 2), hidden=[4])
    return cls(GDumb.parse_args({}), net, ctx)


def _run_tasks(m, tasks=(Task(0, 0, 2), Task(1, 2, 4))):
    for task in tasks:
        m.task = task
        m.grow(task)
        m.before_task(task)


def _inclusion(cls=GDumb, trials: int = 300) -> torch.Tensor:
    """How often each sample of class 0 is in memory after the two tasks, over ``trials`` run seeds."""
    torch.manual_seed(0)
    kept = torch.zeros(100)
    for seed in range(trials):
        m = _fake_gdumb(seed, cls=cls)
        _run_tasks(m)
        assert counts(m.memory) == [10, 10, 10, 10]
        kept[m.memory.exemplars[0]] += 1
    return kept / trials


def test_every_sample_of_a_class_is_kept_with_the_same_probability():
    """Each of the 100 samples of class 0 ends in memory with probability 10 / 100: the mean inclusion of
    each tenth of the class (in index order) lies within 4 standard errors of 0.1."""
    groups = _inclusion().view(10, 10).mean(1)
    se = (0.1 * 0.9 / (300 * 10)) ** 0.5
    assert torch.all((groups - 0.1).abs() < 4 * se), groups


class _InOrder(GDumb):
    """A wrong stream: the task's samples in index order, not shuffled."""

    def before_task(self, task):
        new = self.ctx.train_data.indices_of(task.classes)
        self.memory.observe(new, self.ctx.train_data.labels[new])
        self.reinitialise(task)


def test_an_unshuffled_stream_fails_the_same_check():
    groups = _inclusion(_InOrder, trials=20).view(10, 10).mean(1)
    se = (0.1 * 0.9 / (20 * 10)) ** 0.5
    assert not torch.all((groups - 0.1).abs() < 4 * se)


def test_the_stream_order_is_seeded_by_the_run_and_the_task():
    a, b, c = _fake_gdumb(3), _fake_gdumb(3), _fake_gdumb(4)
    torch.manual_seed(0)
    _run_tasks(a)
    torch.manual_seed(0)
    _run_tasks(b)
    torch.manual_seed(0)
    _run_tasks(c)
    assert torch.equal(a.memory.slots, b.memory.slots)
    assert not torch.equal(a.memory.slots, c.memory.slots)


# -- re-initialisation ------------------------------------------------------------------------------------


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def _scramble(net):
    """Stand-in for training: every parameter and BatchNorm statistic moved."""
    for p in net.parameters():
        p.add_(torch.randn_like(p))
    for name, b in net.named_buffers():
        if b.is_floating_point():
            b.add_(1.0)


def test_before_task_reinitialises_every_parameter_independently_of_the_past():
    # a: trained (scrambled) on task 0, RNG consumed; b: the same seed, task 0 untouched
    a = tiny_driver("gdumb", FAST, model=SMALL_CONVNET)
    b = tiny_driver("gdumb", FAST, model=SMALL_CONVNET)
    built = _state(a.net)
    open_task(a, 0)
    backbone0 = {k: v for k, v in _state(a.net).items() if k.startswith("backbone.")}
    assert all(torch.equal(v, built[k]) for k, v in backbone0.items())  # the backbone as built
    _scramble(a.net)
    trained = _state(a.net)
    torch.rand(1000)
    open_task(a, 1)
    after = _state(a.net)
    for k, v in after.items():
        if v.is_floating_point() and k in trained:
            assert not torch.equal(v, trained[k]), k  # nothing survives the previous task's training
    open_task(b, 0)
    open_task(b, 1)
    assert after.keys() == _state(b.net).keys()
    for k, v in _state(b.net).items():
        assert torch.equal(v, after[k]), k  # the same weights whatever the history
    # the BatchNorm statistics are reset too
    bn = [m for m in a.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bn)


def test_reinitialisation_keeps_model_init_xavier():
    d = tiny_driver("gdumb", FAST, model={"backbone": "mlp", "hidden": [64], "init": "xavier"})
    open_task(d, 0)
    _scramble(d.net)
    open_task(d, 1)
    for m in d.net.modules():
        if isinstance(m, torch.nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5
            assert m.weight.abs().max() <= bound and torch.equal(m.bias, torch.zeros_like(m.bias))


# -- training: the memory alone, GDumb's own stage ---------------------------------------------------------


def test_training_uses_only_the_memory_and_leaves_it_unchanged():
    d = tiny_driver("gdumb", FAST)
    m = d.method
    open_task(d, 0)
    task = open_task(d, 1)
    memory = set(m.memory.indices().tolist())
    assert sorted(m.train_indices(task).tolist()) == sorted(memory) and len(memory) == 60
    before = m.memory.state_dict()
    seen = []
    plain = m.epoch_batches

    def recorded(indices, batch_size):
        plan = plain(indices, batch_size)
        seen.append(torch.cat(plan).tolist())
        return plan

    m.epoch_batches = recorded
    m.fit(m.param_groups(task), m.train_indices(task), m.stage(task), m.loss, stream=True)
    assert len(seen) == 2
    for epoch in seen:
        assert set(epoch) <= memory and len(epoch) >= len(memory) - 1  # a last batch of one may be dropped
    after = m.memory.state_dict()
    assert after["seen"] == before["seen"] and torch.equal(after["slots"], before["slots"])  # no per-step observe


def test_the_stage_is_gdumbs_own_in_both_modes():
    for mode in ("offline", "online"):
        train = {"epochs": 1} if mode == "online" else {"epochs": 7, "lr": 0.3, "batch_size": 64}
        d = tiny_driver("gdumb", scenario={"name": "B0-Inc2", "mode": mode}, train=train)
        st = d.method.stage(d.scenario.tasks[1])
        assert (st.epochs, st.lr, st.min_lr, st.warmup_epochs, st.batch_size) == (256, 0.05, 0.0005, 1, 16)
        assert (st.optimizer, st.momentum, st.weight_decay, st.schedule) == ("sgd", 0.9, 1e-6, "sgdr")
    st = tiny_driver("gdumb", {"warm_start": False, "epochs": 32}).method.stage(d.scenario.tasks[0])
    assert (st.warmup_epochs, st.epochs) == (0, 32)


def _official_rates(epochs: int, maxlr: float = 0.05, minlr: float = 0.0005, warm: bool = True) -> list[float]:
    """GDumb's main.py ``experiment``: each epoch's rate (with warm: epoch 0 at 0.1 maxlr, epoch 1 at maxlr,
    then CosineAnnealingWarmRestarts(T_0=1, T_mult=2, eta_min=minlr) stepped once per epoch)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=maxlr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=minlr)
    rates = []
    for epoch in range(epochs):
        if warm and epoch <= 0:
            for g in opt.param_groups:
                g["lr"] = maxlr * 0.1
        elif warm and epoch == 1:
            for g in opt.param_groups:
                g["lr"] = maxlr
        elif epoch > 0:
            sched.step()
        rates.append(opt.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("warm", [True, False])
def test_sgdr_matches_the_official_schedule(warm):
    stage = Stage(epochs=128, lr=0.05, schedule="sgdr", min_lr=0.0005, warmup_epochs=int(warm))
    official = _official_rates(128, warm=warm)
    spe = 7
    for epoch, rate in enumerate(official):
        for k in (0, 3, 6):  # constant within the epoch
            assert abs(stage.lr * lr_factor(stage, epoch * spe + k, spe) - rate) < 1e-12, (epoch, k)
    if warm:  # restarts at epochs 1, 2, 4, 8, ...; 128 epochs end a cycle near min_lr
        assert official[:5] == pytest.approx([0.005, 0.05, 0.05, 0.02525, 0.05])
        assert official[-1] < 0.0006


def test_the_other_schedules_are_unchanged():
    assert lr_factor(Stage(epochs=2, lr=1.0), 5, 10) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    assert lr_factor(Stage(epochs=4, lr=1.0, schedule="multistep", milestones=[2]), 25, 10) == pytest.approx(0.1)
    assert lr_factor(Stage(epochs=4, lr=1.0, schedule="constant"), 25, 10) == 1.0
    assert tiny_cfg("finetune", train={"schedule": "sgdr"}).train.schedule == "sgdr"  # a config may name it


def test_before_step_clips_the_gradient_norm():
    d = tiny_driver("gdumb", FAST)
    m = d.method
    open_task(d, 0)
    params = list(m.net.parameters())
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    m.before_step()
    total = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert total == pytest.approx(10.0, rel=1e-5)
    d = tiny_driver("gdumb", {"clip": None})
    open_task(d, 0)
    for p in d.method.net.parameters():
        p.grad = torch.full_like(p, 3.0)
    d.method.before_step()
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in d.method.net.parameters())


def test_cutmix_pastes_one_box_from_a_shuffled_batch():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 12, 10).contiguous()  # image i is all i
    y = torch.arange(8)
    for _ in range(20):
        mixed, y_b, lam = cutmix(x, y, alpha=1.0)
        assert torch.equal(x, torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 12, 10))  # the input is left alone
        for i in range(8):
            own = (mixed[i] == i).float().mean().item()
            pasted = (mixed[i] == y_b[i]).float().mean().item()
            if y_b[i] != i:
                assert own == pytest.approx(lam) and own + pasted == pytest.approx(1.0)
        assert sorted(y_b.tolist()) == list(range(8))  # a permutation of the batch


def test_the_loss_mixes_the_two_labels_by_lambda():
    d = tiny_driver("gdumb", {"cutmix_prob": 1.0}, model=SMALL_CONVNET)
    m = d.method
    task = open_task(d, 0)
    idx = m.train_indices(task)[:16]
    x, y = d.runtime.train_batch(idx, False)
    m.net.eval()
    torch.manual_seed(5)
    value = m.loss(x, y)
    torch.manual_seed(5)
    torch.rand(())  # the draw of the coin
    xm, y_b, lam = cutmix(x, y, 1.0)
    z = m.net(xm)["logits"]
    hand = lam * torch.nn.functional.cross_entropy(z, y) + (1 - lam) * torch.nn.functional.cross_entropy(z, y_b)
    torch.testing.assert_close(value, hand)
    d = tiny_driver("gdumb", {"cutmix_prob": 0.0})
    task = open_task(d, 0)
    x, y = d.runtime.train_batch(d.method.train_indices(task)[:16], False)
    torch.testing.assert_close(d.method.loss(x, y), torch.nn.functional.cross_entropy(d.method.net(x)["logits"], y))


# -- test time ----------------------------------------------------------------------------------------------


def test_classes_absent_from_the_memory_are_masked():
    # 2 slots: one for each class of the first task; then K // 3 = 0, so the second task's classes never enter
    d = tiny_driver("gdumb", FAST, memory={"size": 2})
    m = d.method
    open_task(d, 0)
    assert m._absent is None
    open_task(d, 1)
    assert m.memory.classes == [0, 1]
    x, _ = d.runtime.train_batch(d.runtime.train_data.indices_of([2, 3])[:8], False)
    z = m.inference(x)["logits"]
    assert (z[:, 2:] == torch.finfo(z.dtype).min).all() and (z[:, :2] > torch.finfo(z.dtype).min).all()
    assert (z.argmax(1) < 2).all()


# -- configuration ------------------------------------------------------------------------------------------


def test_config_defaults_and_refusals(tmp_path):
    cfg = tiny_cfg("gdumb")
    assert cfg.memory.selection == "balanced" and METHODS["gdumb"].memory_use == "required"
    assert tiny_cfg("gdumb", memory={"size": 60, "selection": "reservoir"}).memory.selection == "reservoir"
    with pytest.raises(ConfigError, match="memory.selection"):
        tiny_cfg("gdumb", memory={"size": 60, "selection": "herding"})
    with pytest.raises(ConfigError, match="keep_optimizer"):
        tiny_cfg("gdumb", train={"keep_optimizer": True})
    with pytest.raises(ConfigError, match="replay_ratio"):
        tiny_cfg("gdumb", memory={"size": 60, "replay_ratio": 1.0})
    with pytest.raises(ConfigError, match="min_lr"):
        tiny_cfg("gdumb", {"lr": 0.01, "min_lr": 0.02})
    with pytest.raises(ConfigError, match="memory.size"):
        tiny_cfg("gdumb", memory={"size": 0})
    for preset in ("protocols/digits/gdumb", "protocols/fmnist/gdumb"):
        cfg = cilkit.resolve([load_yaml(preset), {"data": {"root": str(tmp_path), "download": True}}])
        assert cfg.method == "gdumb" and cfg.memory.selection == "balanced"
        assert cfg.method_args == {"epochs": 128, "cutmix_prob": 0.0}


# -- end to end ---------------------------------------------------------------------------------------------


def _run(tmp_path, method: str, mode: str, name: str, method_args: dict | None = None) -> dict:
    layer = {**SMOKE, "method": method, "method_args": method_args or {}, "memory": {"size": 60},
             "scenario": {**SMOKE["scenario"], "mode": mode}}
    if mode == "online":
        layer.pop("train")  # the online profile: one pass in batches of 10
    if METHODS[method].memory_use == "none":
        layer.pop("memory")
    return Experiment(cilkit.resolve([layer]), tmp_path / name, progress="off").execute()


def test_digits_runs_beat_finetune_offline_and_online(tmp_path):
    figures = {}
    for mode in ("offline", "online"):
        g = _run(tmp_path, "gdumb", mode, f"gdumb-{mode}", {"epochs": 32})  # 1 + 1 + 2 + 4 + 8 + 16: whole cycles
        f = _run(tmp_path, "finetune", mode, f"finetune-{mode}")
        assert g["complete"] and g["summary"]["last_accuracy"] > f["summary"]["last_accuracy"] + 10
        assert g["summary"]["avg_incremental_accuracy"] > f["summary"]["avg_incremental_accuracy"]
        assert [t["memory_max_per_class"] - t["memory_min_per_class"] for t in g["tasks"]] == [0, 0]  # 60 = 12 x 5 = 6 x 10
        figures[mode] = g
    # GDumb sees each sample once in both modes and trains on its memory with its own schedule: the same run
    drop = {"wall_time_s", "train_seconds", "train_images_per_s", "phase_seconds"}
    same = [{k: v for k, v in t.items() if k not in drop} for t in figures["offline"]["tasks"]]
    assert same == [{k: v for k, v in t.items() if k not in drop} for t in figures["online"]["tasks"]]


def test_resumed_run_equals_the_uninterrupted_run(run_cut_and_resumed):
    cfg = tiny_cfg("gdumb", {"epochs": 4, "cutmix_prob": 0.5}, model=SMALL_CONVNET, scenario={"name": "B4-Inc2"})
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=1)
    assert len(partial["tasks"]) == 1 and resumed["complete"] and len(full["tasks"]) == 4
    drop = {"wall_time_s", "train_seconds", "train_images_per_s", "phase_seconds"}

    def figures(m):
        return json.dumps([{k: v for k, v in t.items() if k not in drop} for t in m["tasks"]], sort_keys=True)

    assert figures(resumed) == figures(full)
