"""ER-ACE: the asymmetric cross-entropy's mask on hand-made logits, plain CE on the first task, the
replay term over every seen class, the reference codes' options, and a run on digits."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.memory.stream import StreamMemory
from cilkit.methods.er_ace import ERACE, asymmetric_ce, present_mask
from cilkit.models.heads import CosineLinear
from tests.tiny import FakeContext, LinearNet, FixedLogits, assert_complete_run, tiny_driver




def method(net, memory=None, data=None, **hp) -> ERACE:
    ctx = FakeContext(memory=memory if memory is not None else StreamMemory(4, "reservoir"))  # empty by default
    if data is not None:  # the memory batch: training index -> (input, label)
        ctx.batch = lambda idx, augment=True: (data[0][idx], data[1][idx])
    return ERACE(ERACE.Hyper(**hp), net, ctx)


# -- the mask --------------------------------------------------------------------------------------


def test_a_class_absent_from_the_batch_gets_no_mass_and_no_gradient():
    z = torch.tensor([[2.0, 1.0, 0.5, 3.0], [0.0, 4.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, 2])  # classes 1 and 3 are absent
    assert present_mask(y, 4).tolist() == [True, False, True, False]
    loss = asymmetric_ce(z, y)
    # by hand: the softmax over columns 0 and 2 only
    kept = z.detach()[:, [0, 2]]
    expected = -(kept.log_softmax(1)[torch.arange(3), torch.tensor([0, 1, 1])]).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(z.grad[:, [1, 3]] == 0)  # exactly no gradient on the absent classes' logits
    assert torch.all(z.grad[:, [0, 2]] != 0)
    masked = z.detach().masked_fill(~present_mask(y, 4), float("-inf")).softmax(1)
    assert torch.all(masked[:, [1, 3]] == 0) and torch.allclose(masked.sum(1), torch.ones(3))


def test_open_from_keeps_the_largest_seen_class_and_the_ones_after_it():
    y = torch.tensor([0, 0])
    assert present_mask(y, 5, open_from=3).tolist() == [True, False, False, True, True]
    z = torch.randn(2, 5, requires_grad=True)
    asymmetric_ce(z, y, open_from=3).backward()
    assert torch.all(z.grad[:, 1:3] == 0) and torch.all(z.grad[:, 3:] != 0)


# -- the loss of the method ----------------------------------------------------------------------


def test_first_task_is_plain_cross_entropy():
    z = torch.tensor([[2.0, 1.0, 0.5, 3.0], [0.0, 4.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])  # class 1 is absent: the mask would change the loss
    m = method(FixedLogits(z))
    m.task = Task(0, 0, 4)
    assert torch.equal(m.loss(None, y), F.cross_entropy(z, y))
    assert not torch.allclose(asymmetric_ce(z, y), F.cross_entropy(z, y))
    # from the second task on (or with task_free), the incoming batch is masked
    m.task = Task(1, 2, 4)
    assert torch.equal(m.loss(None, y), asymmetric_ce(z, y))
    m_free = method(FixedLogits(z), task_free=True)
    m_free.task = Task(0, 0, 4)
    assert torch.equal(m_free.loss(None, y), asymmetric_ce(z, y))


def test_replay_term_is_added_over_every_seen_class():
    torch.manual_seed(1)
    inputs, labels = torch.randn(20, 3), torch.arange(20) % 4
    memory = StreamMemory(6, "reservoir")
    memory.observe(torch.arange(6), labels[:6])
    net = LinearNet()
    m = method(net, memory, (inputs, labels))
    m.task = Task(1, 2, 4)
    drawn = []
    sample = memory.sample
    memory.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
    x, y = inputs[10:14], torch.tensor([2, 2, 3, 2])
    loss = m.loss(x, y)
    (idx, _), = drawn
    assert len(idx) == 4  # a replay batch of the stream batch's size
    expected = asymmetric_ce(net(x)["logits"], y) + F.cross_entropy(net(inputs[idx])["logits"], labels[idx])
    assert torch.allclose(loss, expected)  # summed, as both reference codes do
    # the first task does not replay (task_free: false)
    m.task = Task(0, 0, 2)
    drawn.clear()
    m.loss(x, torch.tensor([0, 1, 0, 1]))
    assert drawn == []


def test_open_unseen_follows_the_stream_and_is_checkpointed():
    z = torch.zeros(2, 6, requires_grad=True)
    m = method(FixedLogits(z), open_unseen=True)
    m.task = Task(1, 2, 6)
    m.loss(None, torch.tensor([2, 3]))  # seen max 3: columns 3.. stay open
    assert int(m.seen_max) == 3
    m.loss(None, torch.tensor([2, 2])).backward()
    assert torch.all(z.grad[:, [0, 1]] == 0) and torch.all(z.grad[:, [2, 3, 4, 5]] != 0)
    other = method(FixedLogits(z), open_unseen=True)
    other.load_state_dict(m.state_dict())
    assert int(other.seen_max) == 3


def test_cosine_classifier_option():
    net = types.SimpleNamespace(feature_dim=8, head=None)
    m = method(net, classifier="cosine")
    assert isinstance(m.net.head, CosineLinear) and float(m.net.head.sigma) == 10.0
    assert not any(p is m.net.head.sigma for p in m.net.head.parameters())  # a fixed scale
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(head="fixed"))
    with pytest.raises(ConfigError, match="classifier"):
        ERACE.check_config(cfg, ERACE.Hyper(classifier="cosine"))
    ERACE.check_config(cfg, ERACE.Hyper())
    with pytest.raises(ConfigError, match="classifier"):
        cilkit.resolve([{"method": "er-ace", "model": {"head": "fixed"}, "method_args": {"classifier": "cosine"}}])


def test_with_a_fixed_head_the_mask_covers_the_classes_not_seen_yet():
    z = torch.zeros(2, 10, requires_grad=True)  # a fixed head: all 10 columns from the first task
    m = method(FixedLogits(z))
    m.task = Task(1, 2, 4)
    m.loss(None, torch.tensor([2, 3])).backward()
    assert torch.all(z.grad[:, 4:] == 0) and torch.all(z.grad[:, 2:4] != 0)  # the paper: present classes only
    z.grad = None
    m_code = method(FixedLogits(z), open_unseen=True)
    m_code.task = Task(1, 2, 4)
    m_code.loss(None, torch.tensor([2, 3])).backward()
    assert torch.all(z.grad[:, :2] == 0) and torch.all(z.grad[:, 2:] != 0)  # the codes: unseen ones stay open
    cilkit.resolve([{"method": "er-ace", "model": {"head": "fixed"}}])  # allowed


# -- config and a run -------------------------------------------------------------------------------


def test_config_defaults_to_a_reservoir_and_trains_on_the_stream_only():
    cfg = cilkit.resolve([{"method": "er-ace", "scenario": {"mode": "online"}}])
    assert cfg.memory.selection == "reservoir"
    d = tiny_driver("er-ace", memory={"size": 40})
    d.run_task(d.scenario.tasks[0])
    assert len(d.memory) == 40


def test_online_run(tmp_path):
    layer = {"method": "er-ace", "scenario": {"name": "B0-Inc5", "mode": "online"},
             "model": {"backbone": "mlp", "hidden": [100, 100]}, "train": {"lr": 0.05}, "memory": {"size": 100}}
    exp = cilkit.Experiment(cilkit.resolve([layer]), tmp_path / "er-ace", progress="off")
    assert_complete_run(exp.execute(), floor=(60.0, 25.0), nme=True)
