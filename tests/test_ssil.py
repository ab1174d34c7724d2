"""SS-IL: separated softmax, task-wise KD, ratio-preserving batches, lr/(t+1), memory rule, smoke run."""

import math
from collections import Counter

import pytest
import torch
from tiny import assert_complete_run, open_task, smoke_run, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.memory.exemplars import ceil_trim_first
from cilkit.methods.ssil import separated_ce, task_wise_kd


def _driver(method_args=None, **sections):
    return tiny_driver("ssil", method_args, **sections)


def _at_task1(d, per_class=25):
    """The driver at task 1 (grown, teacher made) with a hand-filled memory of the task-0 classes."""
    m, data = d.method, d.runtime.train_data
    t0 = d.scenario.tasks[0]
    m.task = t0
    m.grow(t0)  # task 0's structure, as a resume replays it
    for c in t0.classes:
        m.memory.exemplars[c] = data.indices_of([c]).cpu()[:per_class]
    return open_task(d, 1)


# -- separated softmax ---------------------------------------------------------------------------


def test_separated_ce_by_hand():
    z = torch.tensor([[2.0, 0.5, -1.0, 0.3, 1.0], [0.1, 0.2, 3.0, -2.0, 0.0], [1.0, 1.0, 1.0, 2.0, -1.0]])
    y = torch.tensor([3, 1, 4])  # n_old = 3: samples 0 and 2 new, sample 1 replayed

    def ce(row, k):
        return -(row[k] - torch.logsumexp(row, 0))

    hand = (ce(z[0, 3:], 0) + ce(z[1, :3], 1) + ce(z[2, 3:], 1)) / 3
    torch.testing.assert_close(separated_ce(z, y, 3), hand)
    # no old classes: the plain cross-entropy over all logits
    torch.testing.assert_close(separated_ce(z, y, 0), torch.nn.functional.cross_entropy(z, y))


def test_no_gradient_crosses_between_old_and_new_logits():
    n_old = 3
    z = torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([4, 1, 5, 0])  # new, old, new, old
    for i in range(4):
        (g,) = torch.autograd.grad(separated_ce(z[i : i + 1], y[i : i + 1], n_old), z)
        if y[i] >= n_old:  # a new-class sample: old logits get exactly zero
            assert torch.equal(g[i, :n_old], torch.zeros(n_old)) and g[i, n_old:].abs().sum() > 0
        else:  # a replayed sample: new logits get exactly zero
            assert torch.equal(g[i, n_old:], torch.zeros(6 - n_old)) and g[i, :n_old].abs().sum() > 0
    # the same on the whole batch, row by row
    (g,) = torch.autograd.grad(separated_ce(z, y, n_old), z)
    new = y >= n_old
    assert torch.equal(g[new, :n_old], torch.zeros(2, n_old))
    assert torch.equal(g[~new, n_old:], torch.zeros(2, 6 - n_old))


# -- task-wise KD --------------------------------------------------------------------------------


def _kl_by_hand(t_row, s_row, T):
    q = torch.exp(t_row / T) / torch.exp(t_row / T).sum()
    p = torch.exp(s_row / T) / torch.exp(s_row / T).sum()
    return (q * (q / p).log()).sum()


def test_tkd_equals_hand_computation_summed_over_tasks():
    T = 2.0
    s = torch.tensor([[1.0, -1.0, 0.5, 2.0], [0.0, 3.0, -1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0, 1.0], [-1.0, 1.0, 0.0, 0.5]])
    slices = [slice(0, 2), slice(2, 4)]  # two earlier tasks of two classes
    hand = sum(_kl_by_hand(t[b, sl], s[b, sl], T) for sl in slices for b in range(2)) / 2 * T * T
    tkd = task_wise_kd(s, t, slices, T)
    torch.testing.assert_close(tkd, hand)
    # a global softmax over the four old classes (GKD) is a different number
    gkd = task_wise_kd(s, t, [slice(0, 4)], T)
    hand_gkd = sum(_kl_by_hand(t[b], s[b], T) for b in range(2)) / 2 * T * T
    torch.testing.assert_close(gkd, hand_gkd)
    assert abs(tkd.item() - gkd.item()) > 1e-3
    # identical logits: zero; the T^2 factor is there
    assert task_wise_kd(s, s, slices, T).abs().item() < 1e-6
    kl_only = sum(_kl_by_hand(t[b, sl], s[b, sl], T) for sl in slices for b in range(2)) / 2
    torch.testing.assert_close(tkd / (T * T), kl_only)  # the T^2 factor
    assert tkd.item() > kl_only.item() * 3.9


def test_method_slices_are_the_earlier_tasks():
    d = _driver()
    m = d.method
    for task in d.scenario.tasks[:3]:
        m.task = task
        m.grow(task)
    assert m.old_slices() == [slice(0, 2), slice(2, 4)]
    m.hp.distill = "global"
    assert m.old_slices() == [slice(0, 4)]


def test_loss_at_the_start_of_task1_is_the_separated_ce():
    """Student == teacher right after before_task: TKD is zero, the loss is L_CE-SS alone."""
    d = _driver()
    _at_task1(d)
    m, rt = d.method, d.runtime
    assert m.teacher is not None
    idx = m.epoch_batches(m.train_indices(m.task), 64)[0]
    x, y = rt.train_data.batch(idx)
    x = rt.augment.train(x)
    m.net.eval()  # no BatchNorm/dropout difference between the two forward passes
    torch.testing.assert_close(m.loss(x, y), separated_ce(m.net(x)["logits"], y, m.n_old))
    with torch.no_grad():
        m.net.head.blocks[0].weight[0].add_(0.5)  # now the student differs from the teacher on task 0
    assert m.loss(x, y) > separated_ce(m.net(x)["logits"], y, m.n_old) + 1e-4


# -- batches -------------------------------------------------------------------------------------


def test_new_data_batches_have_a_fixed_number_of_exemplars():
    d = _driver()
    t1 = _at_task1(d, per_class=25)
    m, labels = d.method, d.runtime.train_data.labels
    new = d.runtime.train_data.indices_of(t1.classes)
    memory = set(m.memory.indices().tolist())
    plan = m.epoch_batches(m.train_indices(t1), 64)
    assert len(plan) == math.ceil(len(new) / 64)
    seen_new, uses = [], Counter()
    for k, b in enumerate(plan):
        is_new = labels[b] >= t1.start
        n_new = int(is_new.sum())
        assert n_new == (64 if k < len(plan) - 1 else len(new) - 64 * (len(plan) - 1))
        assert int((~is_new).sum()) == 32
        assert set(b[~is_new].tolist()) <= memory
        seen_new += b[is_new].tolist()
        uses.update(b[~is_new].tolist())
    assert sorted(seen_new) == sorted(new.tolist())  # one pass over the new data
    assert set(uses) == memory and max(uses.values()) - min(uses.values()) <= 1  # memory cycled evenly


def test_first_task_batches_are_plain_new_data():
    d = _driver()
    t0 = open_task(d, 0)
    new = d.method.train_indices(t0)
    plan = d.method.epoch_batches(new, 64)
    assert len(plan) == math.ceil(len(new) / 64)
    assert sorted(torch.cat(plan).tolist()) == sorted(new.tolist())


@pytest.mark.parametrize("per_class", [25, 1])
def test_zip_batches_follow_the_official_loaders(per_class):
    """drop_last on both loaders; the replay loader's length is the training-set size, so with a tiny
    memory (2 exemplars < 32 a batch) the epoch is still floor(n_new / B) batches."""
    d = _driver({"epoch": "zip"})
    t1 = _at_task1(d, per_class=per_class)
    m, data = d.method, d.runtime.train_data
    labels = data.labels
    n_new = len(data.indices_of(t1.classes))
    plan = m.epoch_batches(m.train_indices(t1), 64)
    assert len(plan) == min(n_new // 64, len(data) // 32) == n_new // 64
    for b in plan:
        is_new = labels[b] >= t1.start
        assert int(is_new.sum()) == 64 and int((~is_new).sum()) == 32
        assert set(b[~is_new].tolist()) <= set(m.memory.indices().tolist())


# -- schedule, memory, config --------------------------------------------------------------------


def test_learning_rate_is_divided_by_task_index_plus_one():
    m = _driver(train={"epochs": 2, "lr": 0.3, "first_lr": 0.2}).method
    stages = [m.stage(Task(t, 2 * t, 2 * t + 2)) for t in range(4)]
    assert [s.lr for s in stages] == pytest.approx([0.2, 0.3 / 2, 0.3 / 3, 0.3 / 4])
    plain = _driver({"lr_decay_per_task": False}, train={"epochs": 2, "lr": 0.3})
    assert plain.method.stage(Task(3, 6, 8)).lr == pytest.approx(0.3)


def test_paper_memory_rule_ceil_then_trim_first_samples():
    pool = {c: torch.arange(100 * c, 100 * c + 10) for c in range(5)}
    mem: dict = {}
    ceil_trim_first(mem, range(3), pool.__getitem__, total=10, per_class=None)
    # ceil(10/3) = 4 a class = 12, two too many: one dropped from the two latest classes
    assert {c: v.tolist() for c, v in mem.items()} == {0: [0, 1, 2, 3], 1: [100, 101, 102], 2: [200, 201, 202]}
    ceil_trim_first(mem, range(3, 4), pool.__getitem__, total=10, per_class=None)
    assert [len(mem[c]) for c in range(4)] == [3, 3, 2, 2] and mem[3].tolist() == [300, 301]
    ceil_trim_first(mem, range(4, 5), pool.__getitem__, total=10, per_class=None)
    assert [len(mem[c]) for c in range(5)] == [2, 2, 2, 2, 2]
    fixed: dict = {}
    ceil_trim_first(fixed, range(3), pool.__getitem__, total=None, per_class=4)
    assert [len(v) for v in fixed.values()] == [4, 4, 4]


@pytest.mark.parametrize("args, field", [({"replay_batch_size": 0}, "replay_batch_size"), ({"T": 0}, "T")])
def test_ranges_are_checked_at_resolve_before_any_data(monkeypatch, args, field):
    def no_data(*a, **k):
        raise AssertionError("the data was read")

    monkeypatch.setattr("cilkit.experiment.load_dataset", no_data)
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "ssil", "method_args": args}])
    assert e.value.field == f"method_args.{field}"


# -- smoke runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [{}, {"epoch": "zip", "memory_rule": "paper"}])
def test_smoke_run(tmp_path, args):
    metrics, exp = smoke_run(tmp_path, "ssil", args)
    assert_complete_run(metrics, nme=True)
    if args.get("memory_rule") == "paper":
        assert [r["memory_size"] for r in metrics["tasks"]] == [60] * 2  # exactly K after every task
        mem, data = exp.driver.memory, exp.runtime.train_data
        assert sorted(mem.exemplars) == list(range(10))
        assert all(torch.equal(mem.exemplars[c], data.indices_of([c]).cpu()[: len(mem.exemplars[c])]) for c in range(10))
