"""Dark Experience Replay (DER in Buzzega et al.; `dark-er`, `dark-er++`): the MSE to stored logits on
hand-made tensors (NaN columns ignored), the logits stored being those of the step that stored them,
DER++'s two independent memory batches, replay from the first task, and resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cilkit
from cilkit.data.scenario import Task
from cilkit.memory.stream import StreamMemory
from cilkit.methods import METHODS
from cilkit.methods.dark_er import DarkER, DarkERPlusPlus, stored_logits_mse
from tests.tiny import FakeContext, LinearNet, tiny_cfg, tiny_driver




def method(cls, memory, data, **hp):
    ctx = FakeContext(memory=memory)
    ctx.batch = lambda idx, augment=True: (data[0][idx], data[1][idx])
    m = cls(cls.Hyper(**hp), LinearNet(), ctx)
    m.task = Task(0, 0, 4)
    return m


# -- the logit-matching term ---------------------------------------------------------------------------


def test_mse_equals_mammoths_when_every_column_is_stored():
    torch.manual_seed(0)
    z, stored = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(stored_logits_mse(z, stored), F.mse_loss(z, stored))


def test_mse_ignores_nan_columns_and_columns_not_stored():
    z = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 1.0, -1.0, 9.0]], requires_grad=True)
    nan = float("nan")
    stored = torch.tensor([[0.0, 2.0, nan], [1.0, 3.0, 0.0]])  # row 0 stored before the head grew
    # by hand: (1 + 0) from row 0, (1 + 4 + 1) from row 1, over the 5 stored entries
    loss = stored_logits_mse(z, stored)
    assert torch.isclose(loss, torch.tensor(7.0 / 5))
    loss.backward()
    assert z.grad[0, 2] == 0 and torch.all(z.grad[:, 3] == 0)  # a NaN entry and a column not stored
    assert torch.allclose(z.grad[1, :3], 2 * torch.tensor([-1.0, -2.0, -1.0]) / 5)
    assert torch.isfinite(z.grad).all()


def test_der_loss_is_ce_plus_alpha_mse_on_a_memory_batch():
    torch.manual_seed(1)
    inputs, labels = torch.randn(20, 3), torch.arange(20) % 4
    memory = StreamMemory(8, "reservoir")
    stored = torch.randn(8, 4)
    memory.observe(torch.arange(8), labels[:8], logits=stored)
    m = method(DarkER, memory, (inputs, labels), alpha=0.3)
    drawn = []
    sample = memory.sample
    memory.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
    x, y = inputs[10:13], labels[10:13]
    loss = m.loss(x, y)
    (idx, pos), = drawn
    assert len(idx) == 3  # a memory batch of the stream batch's size
    net = m.net
    expected = F.cross_entropy(net(x)["logits"], y) + 0.3 * F.mse_loss(net(inputs[idx])["logits"], stored[pos])
    assert torch.allclose(loss, expected)
    assert torch.equal(m.step_logits, net(x)["logits"].detach())  # kept for observe, detached
    assert not m.step_logits.requires_grad


def test_replay_starts_as_soon_as_the_memory_holds_a_sample():
    inputs, labels = torch.randn(10, 3), torch.arange(10) % 2
    memory = StreamMemory(4, "reservoir")
    m = method(DarkER, memory, (inputs, labels))
    x, y = inputs[:2], labels[:2]
    assert torch.allclose(m.loss(x, y), F.cross_entropy(m.net(x)["logits"], y))  # empty: CE only
    m.observe(torch.arange(2), y)
    assert torch.equal(memory.payload["logits"][:2], m.step_logits)
    with torch.no_grad():
        m.net.fc.bias += 1.0  # a step later: every logit of the stored samples moved by 1
    expected = F.cross_entropy(m.net(x)["logits"], y) + 0.2 * 1.0  # the first task replays (alpha 0.2)
    assert torch.allclose(m.loss(x, y), expected)


# -- DER++ ---------------------------------------------------------------------------------------------


def test_der_plus_plus_draws_two_independent_memory_batches():
    torch.manual_seed(2)
    inputs, labels = torch.randn(20, 3), torch.arange(20) % 4
    memory = StreamMemory(4, "reservoir")
    stored = torch.randn(4, 4)
    memory.observe(torch.arange(4), labels[:4], logits=stored)
    m = method(DarkERPlusPlus, memory, (inputs, labels), alpha=0.5, beta=2.0, replay_batch_size=2)
    drawn = []
    sample = memory.sample
    memory.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
    x, y = inputs[10:13], labels[10:13]
    loss = m.loss(x, y)
    assert len(drawn) == 2
    (_, p1), (i2, _) = drawn
    net = m.net
    expected = (F.cross_entropy(net(x)["logits"], y) + 0.5 * F.mse_loss(net(inputs[drawn[0][0]])["logits"], stored[p1])
                + 2.0 * F.cross_entropy(net(inputs[i2])["logits"], labels[i2]))
    assert torch.allclose(loss, expected)
    # independent draws (Mammoth's two get_data calls): two batches of 2 from 4 items overlap with
    # probability 5/6; a split of one batch of 4 into halves (the AML code's chunk) never would
    overlaps = 0
    for _ in range(30):
        drawn.clear()
        m.loss(x, y)
        overlaps += bool(set(drawn[0][1].tolist()) & set(drawn[1][1].tolist()))
    assert overlaps > 0


# -- the stored logits in a run ----------------------------------------------------------------------


def test_stored_logits_are_those_of_the_step_that_stored_them():
    """In a 2-task run, each slot's logits are the network's logits of its sample at the step where it was
    offered (before that step's update), over the classes the head had then; NaN for the columns added later."""
    d = tiny_driver("dark-er", memory={"size": 30}, scenario={"name": "B0-Inc5"}, train={"epochs": 2, "batch_size": 16},
                    model={"backbone": "mlp", "hidden": [64], "head": "growing"})
    m = d.method
    seen: dict[int, torch.Tensor] = {}
    loss = m.loss

    def spy(x, y):
        if m.at.epoch == 0:  # the stream is offered in the first epoch only
            with torch.no_grad():
                z = m.net(x)["logits"].float()  # the MLP has no batch statistics: same output as the loss's
            for i, row in zip(m.at.indices.tolist(), z):
                seen[i] = row
        return loss(x, y)

    m.loss = spy
    for task in d.scenario.tasks:
        d.run_task(task)
    payload = d.memory.payload["logits"]
    assert payload.shape == (30, 10)
    widths = set()
    for slot, i in enumerate(d.memory.slots.tolist()):
        width = len(seen[i])
        widths.add(width)
        assert torch.equal(payload[slot, :width], seen[i])
        assert torch.isnan(payload[slot, width:]).all()
    assert widths == {5, 10}  # samples of both tasks, stored before and after the head grew
    with torch.no_grad():  # and not the logits of the trained network
        now = m.net(d.runtime.train_batch(d.memory.slots[:5], False)[0])["logits"]
    assert not torch.allclose(now[:, :5], payload[:5, :5])


def test_dark_er_keeps_a_reservoir_only():
    assert DarkER.selections == ("reservoir",) and DarkERPlusPlus.selections == ("reservoir",)
    assert cilkit.resolve([{"method": "dark-er++"}]).memory.selection == "reservoir"
    for name in ("dark-er", "dark-er++"):
        assert "not Yan et al.'s DER (`der`)" in METHODS[name].paper
    assert "dark-er" in METHODS["der"].paper


def test_resumed_run_equals_the_uninterrupted_run_with_bit_identical_stored_logits(run_cut_and_resumed, tmp_path):
    cfg = tiny_cfg("dark-er++", scenario={"name": "B0-Inc5"}, memory={"size": 60},
                   model={"backbone": "mlp", "hidden": [64], "head": "growing"})  # NaN columns in the stored logits
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=1)
    assert len(partial["tasks"]) == 1 and len(full["tasks"]) == len(resumed["tasks"]) == 2
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"] and a["nme"] == b["nme"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_001.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "task_001.pt", weights_only=True)
    la, lb = a["memory"]["payload"]["logits"], b["memory"]["payload"]["logits"]
    assert torch.equal(a["memory"]["slots"], b["memory"]["slots"])
    assert torch.equal(la.isnan(), lb.isnan()) and torch.equal(la.nan_to_num(), lb.nan_to_num())
    assert la.view(torch.int32).equal(lb.view(torch.int32))  # bit for bit, NaN included
    assert torch.isnan(la).any() and not torch.isnan(la).all()  # task-1 samples stored before the head grew


def test_with_a_fixed_head_every_stored_row_has_all_columns():
    d = tiny_driver("dark-er", memory={"size": 20}, scenario={"name": "B0-Inc5"}, train={"epochs": 1},
                    model={"backbone": "mlp", "hidden": [32], "head": "fixed"})
    d.run_task(d.scenario.tasks[0])
    payload = d.memory.payload["logits"]
    assert payload.shape == (20, 10) and not torch.isnan(payload).any()  # the paper's N columns from the start


def test_the_paper_single_head_is_dark_ers_default():
    """model.head: auto gives Dark Experience Replay the fixed head (its stored logits span every class),
    the other methods the growing one; an explicit choice wins."""
    assert tiny_cfg("dark-er").model.head == "fixed" and tiny_cfg("dark-er++").model.head == "fixed"
    assert tiny_cfg("er").model.head == "growing" and tiny_cfg("replay").model.head == "growing"
    assert tiny_cfg("dark-er", model={"backbone": "mlp", "hidden": [64], "head": "growing"}).model.head == "growing"
