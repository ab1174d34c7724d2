"""LwF and iCaRL: their losses on hand-made tensors, the teacher, and an end-to-end smoke run."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, FixedLogits, assert_complete_run, smoke_run

import cilkit.methods.lwf as lwf_module
from cilkit import resolve
from cilkit.data.scenario import Task
from cilkit.methods.base import Teacher
from cilkit.methods.icarl import ICaRL, bce_targets
from cilkit.methods.lwf import LwF
from cilkit.models.network import build_network

TASK0, TASK1 = Task(0, 0, 2), Task(1, 2, 4)  # two old classes, then two new ones


def _open(m, task):
    """Start ``task`` as the driver does: grow, the teacher (from the second task on), ``before_task``."""
    m.task = task
    m.grow(task)
    m.start_task(task)
    m.before_task(task)


def _method(cls, args=None, second_task=True, ctx=None):
    """A method on a small MLP, after task 0 and (by default) after ``before_task`` of task 1.

    The student is then perturbed, so that student and teacher differ. Returns the method, the
    network as it was when the teacher was taken, and a batch.
    """
    torch.manual_seed(0)
    net = build_network("mlp", (1, 4, 4), hidden=[8])
    m = cls(cls.parse_args(args or {}), net, ctx or FakeContext())
    _open(m, TASK0)
    if second_task:
        _open(m, TASK1)
    snapshot = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 1, 4, 4)
    if not second_task:
        y = torch.tensor([0, 1, 1, 0, 1])
    else:  # LwF trains on the new data only; iCaRL's batches hold exemplars of old classes too
        y = torch.tensor([2, 3, 3, 2, 3]) if cls is LwF else torch.tensor([2, 3, 3, 0, 1])
    return m, snapshot, x, y


def _hand_kd(student, teacher, T, t2):
    p = torch.exp(teacher / T) / torch.exp(teacher / T).sum(1, keepdim=True)
    log_q = student / T - torch.logsumexp(student / T, 1, keepdim=True)
    kd = -(p * log_q).sum(1).mean()
    return kd * T * T if t2 else kd


# -- LwF -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t2, expected", [(False, math.log(2)), (True, 4 * math.log(2))])
def test_lwf_kd_by_hand_on_old_columns_only(t2, expected):
    m, _, x, _ = _method(LwF, {"t2": t2})
    # teacher softmax(t/2) over the old columns = (3/4, 1/4); the student is uniform: KD = ln 2 (x T^2).
    # The teacher's new columns (99) must be ignored.
    m.teacher = Teacher(FixedLogits(torch.tensor([[2 * math.log(3), 0.0, 99.0, 99.0]])))
    student = torch.tensor([[0.0, 0.0, 5.0, -5.0]])
    assert m.old_loss(student, x[:1]).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("ce_mask", ["new", "all"])
@pytest.mark.parametrize("t2", [False, True])
def test_lwf_loss_is_ce_plus_lambda_kd(ce_mask, t2):
    m, snapshot, x, y = _method(LwF, {"lambda_kd": 0.7, "t2": t2, "ce_mask": ce_mask})
    s = m.net(x)["logits"].detach()
    t = snapshot(x)["logits"].detach()[:, :2]
    if ce_mask == "new":
        ce = -(s[:, 2:] - torch.logsumexp(s[:, 2:], 1, keepdim=True)).gather(1, (y - 2)[:, None]).mean()
    else:
        ce = -(s - torch.logsumexp(s, 1, keepdim=True)).gather(1, y[:, None]).mean()
    expected = ce + 0.7 * _hand_kd(s[:, :2], t, 2.0, t2)
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_lwf_teacher_gets_old_logits_of_the_previous_network(monkeypatch):
    m, snapshot, x, y = _method(LwF)
    seen = {}

    def spy(student, teacher, T, t2):
        seen.update(student=student, teacher=teacher, T=T, t2=t2)
        return student.sum() * 0

    monkeypatch.setattr(lwf_module, "kd_loss", spy)
    m.loss(x, y)
    assert seen["teacher"].shape == (5, 2) and seen["student"].shape == (5, 2)
    assert torch.allclose(seen["teacher"], snapshot(x)["logits"][:, :2])
    assert not torch.allclose(seen["teacher"], m.net(x)["logits"][:, :2])  # not the perturbed student
    assert (seen["T"], seen["t2"]) == (2.0, False)


def test_lwf_first_task_is_plain_cross_entropy():
    m, _, x, y = _method(LwF, {"lambda_kd": 5.0}, second_task=False)
    assert m.teacher is None
    assert m.loss(x, y).item() == pytest.approx(F.cross_entropy(m.net(x)["logits"], y).item())


def test_lwf_warm_up_trains_only_the_new_rows_with_the_backbone_frozen():
    calls = []

    def fit(groups, indices, stage, loss, train_mode, **hooks):
        calls.append((groups, stage.epochs, train_mode, loss(x, torch.tensor([2, 3]))))
        return {}

    ctx = FakeContext(
        stage=resolve([{"train": {"epochs": 4}}]).train.stage(1),
        fit=fit,
        train_data=types.SimpleNamespace(indices_of=lambda classes: torch.arange(4)),
    )
    m, _, x, _ = _method(LwF, {"warmup_epochs": 3}, second_task=False, ctx=ctx)
    x = x[:2]
    _open(m, TASK1)
    ((groups, epochs, train_mode, loss),) = calls
    assert epochs == 3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in m.net.head.blocks[1].parameters()}
    train_mode()  # the warm-up's mode: the backbone frozen (BatchNorm in eval mode), the head training
    assert m.net.head.training and not any(mod.training for mod in m.net.backbone.modules())
    m.train_mode()  # the task's own training afterwards: everything trains
    assert all(mod.training for mod in m.net.modules())
    new = m.net(x)["logits"][:, 2:]
    assert loss.item() == pytest.approx(F.cross_entropy(new, torch.tensor([0, 1])).item())  # L_new only


# -- iCaRL -----------------------------------------------------------------------------------------


def test_icarl_bce_targets_by_hand():
    y = torch.tensor([2, 3, 0])  # two new samples, one exemplar of old class 0
    old = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [-math.log(3), 0.0]])
    expected = torch.tensor(
        [
            [0.5, 0.75, 1.0, 0.0],
            [0.75, 0.5, 0.0, 1.0],
            [0.25, 0.5, 0.0, 0.0],  # an exemplar: teacher's scores on the old columns, zeros on the new
        ]
    )
    assert torch.allclose(bce_targets(y, 4, old), expected)
    assert torch.equal(bce_targets(y, 4, None), F.one_hot(y, 4).float())


def test_icarl_loss_is_mean_bce_against_teacher_sigmoid_and_new_one_hot():
    m, snapshot, x, y = _method(ICaRL)
    s = m.net(x)["logits"].detach()
    target = F.one_hot(y, 4).float()
    target[:, :2] = torch.sigmoid(snapshot(x)["logits"].detach()[:, :2])
    sig = torch.sigmoid(s)
    expected = -(target * torch.log(sig) + (1 - target) * torch.log(1 - sig)).mean()
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_icarl_first_task_is_plain_bce_with_one_hot():
    m, _, x, y = _method(ICaRL, second_task=False)
    assert m.teacher is None
    s = m.net(x)["logits"].detach()
    sig = torch.sigmoid(s)
    one_hot = F.one_hot(y, 2).float()
    expected = -(one_hot * torch.log(sig) + (1 - one_hot) * torch.log(1 - sig)).mean()
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_icarl_softmax_kd_is_ce_plus_kd():
    m, snapshot, x, y = _method(ICaRL, {"loss": "softmax_kd"})
    s = m.net(x)["logits"].detach()
    t = snapshot(x)["logits"].detach()[:, :2]
    ce = -(s - torch.logsumexp(s, 1, keepdim=True)).gather(1, y[:, None]).mean()
    expected = ce + _hand_kd(s[:, :2], t, 2.0, False)
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


# -- both ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, args", [(LwF, {}), (ICaRL, {}), (ICaRL, {"loss": "softmax_kd"})])
def test_no_gradient_reaches_the_teacher(cls, args):
    m, _, x, y = _method(cls, args)
    m.loss(x, y).backward()
    teacher = list(m.teacher.module.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert not m.teacher.module.training
    grads = [p.grad for p in m.net.parameters()]
    assert all(g is not None for g in grads)  # backbone, old rows (distillation) and new rows
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["lwf", "icarl"])
def test_smoke_run(tmp_path, method):
    metrics, exp = smoke_run(tmp_path, method)
    assert_complete_run(metrics, nme=method == "icarl")
    assert (exp.driver.memory is None) == (method == "lwf")
    assert all(t["memory_size"] <= 60 for t in metrics["tasks"])
    if method == "lwf":
        assert all(t["memory_size"] == 0 for t in metrics["tasks"])
