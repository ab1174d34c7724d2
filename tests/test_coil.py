"""COIL: transport plans, prospective/retrospective weights, calibration, schedules, loss, end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, open_task, smoke_run, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.base import Teacher
from cilkit.methods.coil import (
    COIL,
    COILHyper,
    calibrate,
    class_prototypes,
    prospective_weights,
    pt_loss,
    pt_schedule,
    retrospective_weights,
    rt_loss,
    rt_schedule,
    transport_plan,
)
from cilkit.models.heads import CosineLinear
from cilkit.models.network import build_network


def _method(hidden=4, **hp):
    net = build_network("mlp", (1, 8, 8), hidden=[hidden], **COIL.backbone_options)
    return COIL(COIL.parse_args(hp), net, FakeContext())


def _two_tasks(m, n_old=3, n_new=2):
    t0 = Task(0, 0, n_old)
    m.task = t0
    m.grow(t0)
    t1 = Task(1, n_old, n_old + n_new)
    m.task = t1
    m.grow(t1)
    return t1


# -- transport plans --------------------------------------------------------------------------------


def test_normalized_plan_meets_both_marginals():
    torch.manual_seed(0)
    cost = torch.rand(4, 3) * 2
    plan = transport_plan(cost, 0.464, "normalized", n_old=4)
    assert plan.shape == (4, 3) and (plan >= 0).all()
    assert torch.allclose(plan.sum(1), torch.full((4,), 1 / 4), atol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((3,), 1 / 3), atol=1e-6)


@pytest.mark.parametrize("n_src,n_dst,n_old", [(4, 3, 4), (3, 4, 4)])  # PT (old -> new) and RT (new -> old)
def test_pycil_plan_meets_its_rows_and_is_the_normalized_plan_up_to_scale(n_src, n_dst, n_old):
    """a = b = 1/|C_old|: rows meet a exactly; columns are b rescaled to a's mass (sum a)."""
    torch.manual_seed(1)
    cost = torch.rand(n_src, n_dst) * 2
    plan = transport_plan(cost, 0.464, "pycil", n_old=n_old)
    mass = n_src / n_old
    assert torch.allclose(plan.sum(1), torch.full((n_src,), 1 / n_old), atol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((n_dst,), mass / n_dst), atol=1e-6)
    assert torch.allclose(plan, mass * transport_plan(cost, 0.464, "normalized", n_old), atol=1e-6)


def test_prototypes_are_unit_means_of_unit_features():
    f = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0], [0.0, 0.0]])
    P = class_prototypes(f[:3], [2, 1])
    r = 1 / math.sqrt(2)
    assert torch.allclose(P, torch.tensor([[r, r], [-1.0, 0.0]]))
    assert torch.equal(class_prototypes(f[:0], [0]), torch.zeros(1, 2))  # a class without samples


# -- prospective / retrospective weights --------------------------------------------------------------


def _permuted_prototypes():
    """Three distinct unit old prototypes; the new classes sit next to old classes 2, 0, 1."""
    P_old = torch.eye(3)
    P_new = F.normalize(P_old[[2, 0, 1]] + 0.05 * torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), dim=1)
    return P_old, P_new


@pytest.mark.parametrize("marginals", ["normalized", "pycil"])
def test_near_deterministic_pt_maps_each_new_class_to_its_nearest_old_direction(marginals):
    P_old, P_new = _permuted_prototypes()
    W_old = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, -2.0, 0.0, 1.0], [0.0, 0.0, 5.0, 5.0]])  # norms differ
    hp = COILHyper(sinkhorn_reg=0.01, marginals=marginals)
    W, gamma = prospective_weights(P_old, P_new, W_old, hp)
    target = F.normalize(W_old[[2, 0, 1]], dim=1)
    assert torch.allclose(F.normalize(W, dim=1), target, atol=1e-4)
    # calibrated: the mean norm of the new rows is the mean norm of the old ones
    assert W.norm(dim=1).mean().item() == pytest.approx(W_old.norm(dim=1).mean().item(), rel=1e-5)
    assert gamma > 0


def test_pt_rows_are_convex_combinations_with_normalized_marginals_before_calibration():
    """With reg large the plan is nearly uniform: every new row ~ the mean of the unit old rows."""
    P_old, P_new = _permuted_prototypes()
    W_old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    hp = COILHyper(sinkhorn_reg=1e4)
    W, gamma = prospective_weights(P_old, P_new, W_old, hp)
    mean_unit = torch.tensor([0.0, 1.0]) / 3
    assert torch.allclose(W / gamma, mean_unit.expand(3, 2), atol=1e-4)  # W_hat = n_new T^T normalise(W_old)


def test_near_deterministic_rt_maps_each_old_class_to_its_nearest_new_direction():
    P_old, P_new = _permuted_prototypes()  # new c is nearest old [2, 0, 1][c]: old k <- new [1, 2, 0][k]
    W_new = torch.tensor([[1.0, 1.0], [0.0, -4.0], [-2.0, 0.5]])
    W = retrospective_weights(P_old, P_new, W_new, COILHyper(sinkhorn_reg=0.01))
    assert W.shape == (3, 2)
    assert torch.allclose(F.normalize(W, dim=1), F.normalize(W_new[[1, 2, 0]], dim=1), atol=1e-4)


def test_gamma_calibration_equalises_mean_norms_and_keeps_directions():
    W_old = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5, 1: mean 3
    W_hat = torch.tensor([[0.1, 0.0], [0.0, 0.3], [0.2, 0.2]])
    W, gamma = calibrate(W_hat, W_old)
    mean_hat = (0.1 + 0.3 + math.sqrt(0.08)) / 3
    assert gamma == pytest.approx(3.0 / mean_hat, rel=1e-6)
    assert W.norm(dim=1).mean().item() == pytest.approx(3.0, rel=1e-6)
    assert torch.allclose(F.normalize(W, dim=1), F.normalize(W_hat, dim=1))


# -- schedules ----------------------------------------------------------------------------------------


def test_pt_and_rt_weight_schedules():
    assert [pt_schedule(e) for e in range(4)] == [1.0, 0.75, 0.0, 0.0]
    assert rt_schedule(0, 160) == 0.0 and rt_schedule(80, 160) == 0.25 and rt_schedule(160, 160) == 1.0
    assert rt_schedule(1, 160) == pytest.approx(1 / 160**2)


def test_the_loss_reads_epoch_and_step_from_the_loop():
    """The loop publishes where it is (``ctx.at``); COIL's loss sees the epoch, the step and the epochs."""
    d = tiny_driver("coil")
    m = d.method
    task = open_task(d, 0)
    assert m.at is m.ctx.at
    seen, loss = [], m.loss

    def recording(x, y):
        seen.append((m.at.epoch, m.at.step, m.at.epochs, m.net.training))
        return loss(x, y)

    idx = d.runtime.train_data.indices_of(task.classes)[:64]
    m.fit(m.param_groups(task), idx, m.stage(task).replace(batch_size=32), recording)
    assert seen == [(0, 0, 2, True), (0, 1, 2, True), (1, 0, 2, True), (1, 1, 2, True)]


# -- the loss -------------------------------------------------------------------------------------------


def _prepared(**hp):
    """Task 2 of 3 + 2 classes, with a teacher that differs from the student."""
    torch.manual_seed(0)
    m = _method(hidden=6, **hp)
    t1 = _two_tasks(m)
    m.teacher = Teacher(m.net)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.ctx.at.epochs = 10
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 4, 1, 3])
    return m, t1, x, y


def _by_hand(m, x, y, T=2.0):
    """(1 - lambda) CE + lambda KD_T, written out with explicit softmaxes; also f_unit, z, z_old."""
    out = m.net(x)
    z, f = out["logits"], out["features"]
    z_old = m.teacher(x)["logits"][:, :3]
    lam = 3 / 5
    ce = -torch.log(torch.exp(z) / torch.exp(z).sum(1, keepdim=True))[torch.arange(5), y].mean()
    p = torch.exp(z_old / T) / torch.exp(z_old / T).sum(1, keepdim=True)
    logq = z[:, :3] / T - torch.logsumexp(z[:, :3] / T, dim=1, keepdim=True)
    kd = -(p * logq).sum(1).mean()
    return (1 - lam) * ce + lam * kd, F.normalize(f, dim=1), z, z_old


def test_loss_without_transports_is_ce_plus_kd():
    m, _, x, y = _prepared(use_pt=False, use_rt=False)
    expected, *_ = _by_hand(m, x, y)
    for epoch in (0, 5):
        m.ctx.at.epoch, m.ctx.at.step = epoch, 0  # step 0 would recompute an RT plan if RT were on
        assert torch.allclose(m.loss(x, y), expected, atol=1e-5)


def test_epoch0_adds_the_pt_term_and_later_epochs_the_weighted_rt_term():
    m, _, x, y = _prepared()
    m.W_hat = torch.randn(2, 6)
    m.W_retro = torch.randn(3, 6)
    base, f_unit, z, z_old = _by_hand(m, x, y)
    m.ctx.at.epoch, m.ctx.at.step = 0, 1
    target = torch.softmax(f_unit @ F.normalize(m.W_hat, dim=1).t() / 2, dim=1)
    l_pt = -(target * torch.log_softmax(z[:, 3:] / 2, dim=1)).sum(1).mean()
    assert torch.allclose(pt_loss(f_unit, m.W_hat, z[:, 3:], 2.0), l_pt)
    assert torch.allclose(m.loss(x, y), base + 1e-3 * l_pt, atol=1e-6)
    m.ctx.at.epoch, m.ctx.at.step = 4, 1  # not a multiple of rt_every: W_retro is kept
    p = torch.softmax(z_old / 2, dim=1)
    l_rt = -(p * torch.log_softmax(f_unit @ F.normalize(m.W_retro, dim=1).t() / 2, dim=1)).sum(1).mean()
    assert torch.allclose(rt_loss(f_unit, m.W_retro, z_old, 2.0), l_rt)
    assert torch.allclose(m.loss(x, y), base + 1e-3 * (4 / 10) ** 2 * l_rt, atol=1e-6)
    assert l_pt.item() > 0 and l_rt.item() > 0


def test_rt_plan_is_recomputed_every_rt_every_batches():
    m, _, x, y = _prepared(rt_every=3)
    calls = []
    m.retrospective_transport = lambda: calls.append(m.at.step) or torch.randn(3, 6)
    m.ctx.at.epoch = 1
    for b in range(7):
        m.ctx.at.step = b
        m.loss(x, y)
    assert calls == [0, 3, 6]
    m.ctx.at.epoch, m.ctx.at.step = 0, 0  # no RT in epoch 0
    m.loss(x, y)
    assert calls == [0, 3, 6]


def test_prospective_transport_writes_the_calibrated_rows_into_the_new_block():
    m = _method(hidden=3)
    t1 = _two_tasks(m, n_old=3, n_new=3)
    with torch.no_grad():
        m.net.head.blocks[0].copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]))
    P_old, P_new = _permuted_prototypes()
    m.hp.sinkhorn_reg = 0.01
    m.prospective_transport(t1, P_old, P_new)
    new = m.net.head.blocks[1].detach()
    assert torch.allclose(new, 2.0 * torch.eye(3)[[2, 0, 1]], atol=1e-3)  # mean old norm 2, permuted directions
    assert torch.equal(m.W_hat, new) and m.gammas


def test_coil_has_a_learnable_cosine_head_and_checks_rt_every():
    m = _method()
    assert isinstance(m.net.head, CosineLinear) and isinstance(m.net.head.sigma, torch.nn.Parameter)
    assert COIL.memory_use == "required"
    with pytest.raises(ConfigError) as e:
        _method(rt_every=0)
    assert "rt_every" in e.value.field


def test_rt_every_is_checked_at_resolve_before_any_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("cilkit.experiment.load_dataset", no_data)
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "coil", "method_args": {"rt_every": 0}}])
    assert e.value.field == "method_args.rt_every"


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "coil")
    assert_complete_run(metrics, nme=True)
    m = exp.method
    assert len(m.gammas) == 1 and m.gammas[0] > 0  # one prospective transport, at the second task
    assert m.W_hat is None and m.W_retro is None and m.rt_indices == []  # per-task state cleared
