"""GEM and A-GEM: the projections on hand-made tensors, the dual QP against a 2-D case solved by
hand, the step hook on a real batch, the new-data batches with the memory riding along.
(Their smoke runs are tests/test_methods_smoke.py's, parametrized over every method.)"""

import numpy as np
import pytest
import torch
from tiny import open_task, tiny_driver

from cilkit.errors import ConfigError
from cilkit.methods import METHODS
from cilkit.methods.agem import project_agem
from cilkit.methods.gem import flat_grad, own_task_ce, project_gem, solve_gem_dual, task_of_classes, write_grad


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- GEM's projection ------------------------------------------------------------------------------


def test_gem_projection_meets_every_constraint_and_is_the_kkt_point():
    torch.manual_seed(0)
    for _ in range(20):
        G = torch.randn(4, 12, dtype=torch.float64)
        g = -G.sum(0) + 0.3 * torch.randn(12, dtype=torch.float64)  # against every memory gradient
        assert (G @ g < 0).any()
        g_new = project_gem(g, G)
        assert (G @ g_new >= -1e-9).all()
        # closest point of the cone: g~ - g = G^T v with v >= 0 and v_k <g~, g_k> = 0 (KKT)
        v = torch.linalg.lstsq(G.T, g_new - g).solution
        torch.testing.assert_close(G.T @ v, g_new - g)
        assert (v >= -1e-8).all()
        torch.testing.assert_close(v * (G @ g_new), torch.zeros(4, dtype=torch.float64), atol=1e-7, rtol=0)


def test_gem_leaves_a_gradient_that_meets_the_constraints_alone():
    G = t([1.0, 0.0, 2.0], [0.0, 1.0, -1.0])
    g = t(1.0, 1.0, 0.5)  # <g, g_1> = 2, <g, g_2> = 0.5
    assert project_gem(g, G) is g
    assert project_gem(g, G, memory_strength=0.5, eps=1e-3) is g  # the official options apply only to a violation
    g = t(0.0, 0.0, 0.0)  # zero inner products are allowed (>= 0)
    assert project_gem(g, G) is g


def test_gem_dual_qp_against_a_2d_case_solved_by_hand():
    # g_1 = (1, 0), g_2 = (1, 1), g = (-2, 1): both constraints violated (<g, g_k> = -2, -1), but at the
    # closest feasible point (0, 1) only the first is active: v* = (2, 0), g~ = g + 2 g_1
    G, g = t([1.0, 0.0], [1.0, 1.0]), t(-2.0, 1.0)
    gram, q = (G @ G.T).numpy(), (G @ g).numpy()
    np.testing.assert_allclose(solve_gem_dual(gram, q), [2.0, 0.0], atol=1e-9)
    torch.testing.assert_close(project_gem(g, G), t(0.0, 1.0))
    # not A-GEM's single projection on either g_k
    assert not torch.allclose(project_gem(g, G), project_agem(g, G[1]))
    # memory_strength gamma = 0.5 bounds v below: grad of the dual P v + q = (v1 + v2 - 2, v1 + 2 v2 - 1);
    # v2 = 0.5 on its bound, v1 = 1.5 (interior, first component 0), second component 1.5 >= 0
    np.testing.assert_allclose(solve_gem_dual(gram, q, memory_strength=0.5), [1.5, 0.5], atol=1e-9)
    torch.testing.assert_close(project_gem(g, G, memory_strength=0.5), t(0.0, 1.5))


def test_gem_eps_on_the_diagonal_by_hand():
    # one constraint: v = -<g, g_1> / (|g_1|^2 + eps) = 2 / (4 + 1) = 0.4; g~ = (-1, 1) + 0.4 (2, 0)
    G, g = t([2.0, 0.0]), t(-1.0, 1.0)
    torch.testing.assert_close(project_gem(g, G, eps=1.0), t(-0.2, 1.0))
    torch.testing.assert_close(project_gem(g, G), t(0.0, 1.0))  # eps = 0: exactly onto the constraint


def test_gem_solves_parallel_memory_gradients():
    # G G^T is singular: quadprog refuses it as given; the smallest ridge makes it solvable
    G, g = t([1.0, 0.0], [2.0, 0.0]), t(-1.0, 1.0)
    torch.testing.assert_close(project_gem(g, G), t(0.0, 1.0), atol=1e-6, rtol=0)


def test_gem_projection_in_float32_keeps_its_dtype():
    G, g = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([-2.0, 1.0])
    out = project_gem(g, G)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))


# -- A-GEM's projection ------------------------------------------------------------------------------


def test_agem_projection_by_hand():
    g, g_ref = t(1.0, -2.0, 0.0), t(0.0, 1.0, 1.0)
    # <g, g_ref> = -2, <g_ref, g_ref> = 2: g~ = g - (-2 / 2) g_ref = (1, -1, 1)
    out = project_agem(g, g_ref)
    torch.testing.assert_close(out, t(1.0, -1.0, 1.0))
    assert torch.dot(out, g_ref).abs() < 1e-12
    # with one memory gradient GEM's QP gives the same point
    torch.testing.assert_close(project_gem(g, g_ref[None]), out)


def test_agem_leaves_an_agreeing_gradient_alone():
    g, g_ref = t(1.0, 2.0, 0.0), t(0.0, 1.0, 1.0)
    assert project_agem(g, g_ref) is g
    g = t(1.0, 0.0, 0.0)  # orthogonal: <g, g_ref> = 0 is allowed
    assert project_agem(g, g_ref) is g


# -- the losses -----------------------------------------------------------------------------------------


def test_own_task_ce_by_hand():
    z = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 3.0, -2.0]])
    y = torch.tensor([1, 3])
    tasks = task_of_classes([2, 2])
    assert tasks.tolist() == [0, 0, 1, 1]

    def ce(row, k):
        return -(row[k] - torch.logsumexp(row, 0))

    hand = (ce(z[0, :2], 1) + ce(z[1, 2:], 1)) / 2
    torch.testing.assert_close(own_task_ce(z, y, tasks), hand)


def test_flat_gradients_round_trip():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.arange(4.0).view(2, 2)  # b has no gradient: zeros in the flat vector
    assert flat_grad([a, b]).tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    write_grad([a, b], torch.arange(7.0))
    assert a.grad.tolist() == [[0.0, 1.0], [2.0, 3.0]] and b.grad.tolist() == [4.0, 5.0, 6.0]


# -- the step hook and the batches, on the tiny digits run ------------------------------------------------


def _at_task1(method, method_args=None, per_class=12):
    """The tiny driver at task 1 with a hand-filled memory of the task-0 classes."""
    d = tiny_driver(method, method_args)
    m, data = d.method, d.runtime.train_data
    t0 = d.scenario.tasks[0]
    m.task = t0
    m.grow(t0)
    for c in t0.classes:
        m.memory.exemplars[c] = data.indices_of([c]).cpu()[:per_class]
    return d, open_task(d, 1)


def _step(d, idx):
    """One step of the loop up to the optimizer: loss, backward, before_step; returns the batch."""
    m = d.method
    x, y = d.runtime.train_batch(idx, False)
    m.net.zero_grad(set_to_none=True)
    m.loss(x, y).backward()
    return x, y


def _memory_gradients(m, x, y):
    """The gradient of the memory loss of every earlier task, computed afresh (no method code)."""
    params = m.trainable()
    out = []
    for k in range(m.task.index):
        sl = m.net.task_slice(k)
        of_k = (y >= sl.start) & (y < sl.stop)
        loss = torch.nn.functional.cross_entropy(m.net(x[of_k])["logits"], y[of_k])
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return out


@pytest.mark.parametrize("method", ["gem", "agem"])
def test_before_step_leaves_the_gradient_alone_on_the_first_task(method):
    d = tiny_driver(method)
    m = d.method
    task = open_task(d, 0)
    (idx,) = m.epoch_batches(m.train_indices(task), 32)[:1]
    assert len(idx) == 32  # no memory yet: a plain batch of new data
    _step(d, idx)
    before = flat_grad(m.trainable()).clone()
    m.before_step()
    assert torch.equal(flat_grad(m.trainable()), before)
    assert m.task_metrics()["constrained_steps"] == 0


@pytest.mark.parametrize("method", ["gem", "agem"])
def test_before_step_projects_against_the_memory_on_a_later_task(method):
    d, task = _at_task1(method)
    m = d.method
    new = m.train_indices(task)
    labels = d.runtime.train_data.labels
    assert (labels[new.to(labels.device)] >= task.start).all()  # the new data only
    idx = m.epoch_batches(new, 32)[0]
    x, y = _step(d, idx)
    g = flat_grad(m.trainable()).clone()
    m.before_step()
    g_new = flat_grad(m.trainable())
    mem_x, mem_y = x[y < task.start], y[y < task.start]
    (g_k,) = _memory_gradients(m, mem_x, mem_y)
    if torch.dot(g, g_k) < 0:  # violated: projected onto <g~, g_k> = 0 (one earlier task: GEM = A-GEM)
        assert m.projected == 1
        assert abs(torch.dot(g_new, g_k)) <= 1e-5 * g_k.norm() * g.norm()
        torch.testing.assert_close(g_new, g - torch.dot(g, g_k) / torch.dot(g_k, g_k) * g_k, atol=1e-6, rtol=1e-4)
    else:
        assert m.projected == 0 and torch.equal(g_new, g)
    assert m.task_metrics()["constrained_steps"] == 1


def test_gem_batches_carry_every_earlier_tasks_memory():
    d, task = _at_task1("gem")
    m = d.method
    memory = m.memory.indices(range(task.start))
    plan = m.epoch_batches(m.train_indices(task), 32)
    labels = d.runtime.train_data.labels
    for idx in plan:
        old = idx[labels[idx.to(labels.device)].to(idx.device) < task.start]
        assert sorted(old.tolist()) == sorted(memory.tolist())  # the whole M_k, every step
    # a subset of each task's memory when memory_batch_size is set
    d, task = _at_task1("gem", {"memory_batch_size": 10})
    m = d.method
    idx = m.epoch_batches(m.train_indices(task), 32)[0]
    old = idx[labels[idx.to(labels.device)].to(idx.device) < task.start]
    assert len(old) == 10 and len(set(old.tolist())) == 10


def test_agem_draws_a_random_memory_batch_without_replacement():
    d, task = _at_task1("agem", {"replay_batch_size": 20})
    m = d.method
    labels = d.runtime.train_data.labels
    plan = m.epoch_batches(m.train_indices(task), 32)
    draws = []
    for idx in plan:
        old = idx[labels[idx.to(labels.device)].to(idx.device) < task.start]
        assert len(old) == 20 and len(set(old.tolist())) == 20
        draws.append(tuple(sorted(old.tolist())))
    assert len(set(draws)) > 1  # drawn anew at every step
    # a memory smaller than the batch: all of it (24 exemplars < 256)
    d, task = _at_task1("agem")
    idx = d.method.epoch_batches(d.method.train_indices(task), 32)[0]
    old = idx[labels[idx.to(labels.device)].to(idx.device) < task.start]
    assert sorted(old.tolist()) == sorted(d.method.memory.indices().tolist()) and len(old) == 24


def test_gem_with_several_earlier_tasks_meets_every_constraint():
    d = tiny_driver("gem")
    m, data = d.method, d.runtime.train_data
    for task in d.scenario.tasks[:3]:
        m.task = task
        m.grow(task)
        for c in task.classes:
            m.memory.exemplars[c] = data.indices_of([c]).cpu()[:10]
    task = open_task(d, 3)
    idx = m.epoch_batches(m.train_indices(task), 32)[0]
    x, y = _step(d, idx)
    m.before_step()
    g_new = flat_grad(m.trainable())
    for g_k in _memory_gradients(m, x, y):
        assert torch.dot(g_new, g_k) >= -1e-5 * g_k.norm() * g_new.norm()


# -- configuration ------------------------------------------------------------------------------------------


def test_the_methods_are_registered_with_a_memory():
    assert METHODS["gem"].memory_use == METHODS["agem"].memory_use == "required"
    hp = METHODS["gem"].parse_args({})
    assert (hp.memory_strength, hp.eps, hp.memory_batch_size, hp.outputs) == (0.0, 0.0, None, "seen")
    assert METHODS["agem"].parse_args({}).replay_batch_size == 256
    with pytest.raises(ConfigError, match="memory_strength"):
        METHODS["gem"].parse_args({"memory_strength": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        METHODS["agem"].parse_args({"memory_strength": 0.5})


def test_task_outputs_mask_the_losses_to_their_own_task():
    d, _ = _at_task1("agem", {"outputs": "task"})
    m = d.method
    z = torch.randn(3, 4, requires_grad=True)  # 2 tasks of 2 classes on the tiny B0-Inc2 run
    y = torch.tensor([0, 3, 2])
    (grad,) = torch.autograd.grad(m.ce(z, y), z)
    assert torch.equal(grad[0, 2:], torch.zeros(2)) and torch.equal(grad[1:, :2], torch.zeros(2, 2))


def test_plain_sgd_drops_momentum_and_weight_decay_and_refuses_adam():
    d = tiny_driver("gem")
    task = d.scenario.tasks[0]
    stage = d.method.stage(task)
    assert (stage.momentum, stage.weight_decay) == (0.0, 0.0)
    assert stage.lr == d.method.ctx.stage(task).lr  # the rate and the schedule stay the config's
    d = tiny_driver("agem", {"plain_sgd": False})
    stage = d.method.stage(task)
    assert (stage.momentum, stage.weight_decay) == (d.method.ctx.stage(task).momentum, d.method.ctx.stage(task).weight_decay)
    from tiny import tiny_cfg

    adam = {"epochs": 2, "optimizer": "adam", "lr": 1e-3}
    for method in ("gem", "agem"):  # refused when the config is resolved, before any data
        with pytest.raises(ConfigError, match="plain SGD"):
            tiny_cfg(method, train=adam)
        assert tiny_cfg(method, {"plain_sgd": False}, train=adam).train.optimizer == "adam"
