"""EWC, online EWC, SI and MAS: the shared quadratic penalty, the importances against hand computations on
a one-layer model and on a quadratic loss, the checkpointed state, and a resumed run."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, tiny_cfg
from torch import nn

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses.quadratic import accumulate, overlap, penalty_gradient, per_sample_sums, quadratic_penalty
from cilkit.methods.ewc import EWC, OnlineEWC
from cilkit.methods.mas import MAS
from cilkit.methods.si import SI
from cilkit.models.network import IncrementalNet

# -- a one-layer model on hand-made data -----------------------------------------------------------


class Flat(nn.Module):
    """A parameter-free backbone: the features are the input, so the network is one linear layer."""

    def __init__(self, d: int):
        super().__init__()
        self.out_dim = d

    def forward(self, x):
        return {"features": x.flatten(1), "maps": []}


def _data(n=24, d=3, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.arange(n) % n_classes
    store = types.SimpleNamespace(labels=y, indices_of=lambda classes: torch.nonzero(torch.isin(y, torch.as_tensor(list(classes)))).flatten())
    return x, y, store


def _ctx(x, store, batch=7, seed=0):
    """A context whose feature pass sends the samples through ``forward`` in batches of ``batch``, in order."""
    seen = []

    def features(indices, forward, flip=False, transform=None):
        seen.append(indices.clone())
        return torch.cat([forward(x[indices[i : i + batch]])["features"] for i in range(0, len(indices), batch)])

    ctx = FakeContext(train_data=store, features=features, seed=seed)
    ctx.seen = seen
    return ctx


def _linear(cls, args=None, d=3, blocks=(2, 2), x=None, store=None, seed=0):
    torch.manual_seed(seed)
    net = IncrementalNet(Flat(d))
    for n in blocks:
        net.add_classes(n)
    if x is None:
        x, _, store = _data(d=d, n_classes=sum(blocks))
    m = cls(cls.parse_args(args or {}), net, _ctx(x, store))
    return m, x


def _wb(net):
    return net.head.weight.detach(), torch.cat([b.bias for b in net.head.blocks]).detach()


def _by_block(net, full_w, full_b):
    """Split (classes, d) and (classes,) tensors into the head's per-block parameter names."""
    out, start = {}, 0
    for i, blk in enumerate(net.head.blocks):
        k = blk.out_features
        out[f"head.blocks.{i}.weight"], out[f"head.blocks.{i}.bias"] = full_w[start : start + k], full_b[start : start + k]
        start += k
    return out


# -- the shared penalty ----------------------------------------------------------------------------


def test_penalty_counts_only_what_existed_at_the_anchor():
    anchor = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5])}
    omega = {"w": torch.tensor([[1.0, 0.5], [2.0, 0.0]]), "b": torch.tensor([4.0])}
    w = torch.tensor([[2.0, 2.0], [3.0, 5.0], [9.0, 9.0]], requires_grad=True)  # a third row grew since
    b = torch.tensor([1.0, 7.0], requires_grad=True)
    new = torch.tensor([5.0], requires_grad=True)  # created after the anchor
    params = {"w": w, "b": b, "new": new}
    pen = quadratic_penalty(params, anchor, omega)
    assert pen.item() == pytest.approx(1.0 * 1**2 + 0.5 * 0 + 2.0 * 0 + 0.0 * 1**2 + 4.0 * 0.5**2)
    pen.backward()
    assert new.grad is None  # no penalty on a parameter the anchor did not know
    assert torch.equal(w.grad[2], torch.zeros(2)) and b.grad[1] == 0  # nor on rows created since
    analytic = penalty_gradient(params, anchor, omega)
    torch.testing.assert_close(analytic["w"], w.grad)
    torch.testing.assert_close(analytic["b"], b.grad)
    assert set(analytic) == {"w", "b"}
    with pytest.raises(ValueError, match="cannot hold"):
        overlap(torch.zeros(1, 2), (2, 2))


def test_accumulate_decays_the_old_and_adds_to_the_leading_block():
    old = {"w": torch.ones(2, 2), "gone": torch.full((1,), 3.0)}
    new = {"w": torch.full((3, 2), 2.0), "fresh": torch.ones(1)}
    out = accumulate(old, new, decay=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([[2.5, 2.5], [2.5, 2.5], [2.0, 2.0]]))
    assert out["gone"].item() == 1.5 and out["fresh"].item() == 1.0
    assert torch.equal(new["w"], torch.full((3, 2), 2.0))  # the inputs are left as they were
    assert accumulate(None, new)["w"] is not new["w"]


def test_per_sample_sums_square_each_samples_gradient_not_the_batch_mean():
    theta = {"t": torch.tensor([0.3, -1.2])}
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 1.0]])

    def fn(p, xk):
        return torch.sin(p["t"] @ xk)

    by_hand = sum((torch.cos(theta["t"] @ xk) * xk) ** 2 for xk in x)  # d sin(t.x)/dt = cos(t.x) x
    for chunk in (1, 2, 32):
        torch.testing.assert_close(per_sample_sums(fn, theta, (x,), torch.square, chunk)["t"], by_hand)
    batch_grad = sum(torch.cos(theta["t"] @ xk) * xk for xk in x) / len(x)
    assert not torch.allclose(len(x) * batch_grad**2, by_hand)  # what a batch backward would give


# -- EWC ---------------------------------------------------------------------------------------------


def test_empirical_fisher_of_a_one_layer_model_by_hand():
    m, x = _linear(EWC, {"fisher": "empirical"})
    y = m.ctx.train_data.labels
    task = Task(1, 0, 4)  # all four classes: every sample
    fisher = m.fisher(task)
    w, b = _wb(m.net)
    err = F.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 4).float()  # d CE / d z, one row per sample
    hand_w = (err[:, :, None] * x[:, None, :]).pow(2).mean(0)  # mean over samples of (d CE / d W)^2
    hand_b = err.pow(2).mean(0)
    for name, value in _by_block(m.net, hand_w, hand_b).items():
        torch.testing.assert_close(fisher[name], value)
    assert len(m.ctx.seen[0]) == len(x)  # the whole task's data


def test_sampled_fisher_is_the_models_expected_fisher():
    """Labels drawn from p(.|x): on one input repeated, the mean tends to sum_c p_c g_c^2 (the true Fisher)."""
    x0 = torch.tensor([[0.4, -0.3, 0.8]])
    x = x0.repeat(4000, 1)
    _, _, store = _data(n=4000)
    m, _ = _linear(EWC, {"fisher": "sampled"}, x=x, store=store)
    w, b = _wb(m.net)
    p = F.softmax(x0 @ w.T + b, dim=1)[0]
    true_w = sum(p[c] * ((p - F.one_hot(torch.tensor(c), 4))[:, None] * x0).pow(2) for c in range(4))
    true_b = sum(p[c] * (p - F.one_hot(torch.tensor(c), 4)).pow(2) for c in range(4))
    fisher = m.fisher(Task(0, 0, 4))
    for name, value in _by_block(m.net, true_w, true_b).items():
        torch.testing.assert_close(fisher[name], value, rtol=0.08, atol=1e-4)
    again = m.fisher(Task(0, 0, 4))
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)  # a seeded draw, not the training's stream


def test_fisher_samples_takes_a_seeded_subset_of_the_task():
    m, _ = _linear(EWC, {"fisher_samples": 5})
    m.fisher(Task(0, 0, 4))
    m.fisher(Task(0, 0, 4))
    m.fisher(Task(1, 0, 4))
    first, same, other = m.ctx.seen
    assert len(first) == 5 and torch.equal(first, same) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 5


def _consolidate_two_tasks(cls, args):
    """Two tasks whose Fishers are given (F1 = 1, F2 = 3 everywhere); the parameters move between them."""
    m, _ = _linear(cls, args, blocks=(2,))
    fishers = iter([{n: torch.full_like(p, 1.0) for n, p in m.trainable().items()}, None])
    m.fisher = lambda task: next(fishers)
    m.after_task(Task(0, 0, 2))
    theta1 = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    m.net.add_classes(2)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.5)
    fishers = iter([{n: torch.full_like(p, 3.0) for n, p in m.trainable().items()}])
    m.fisher = lambda task: next(fishers)
    m.after_task(Task(1, 2, 4))
    theta2 = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.25)
    return m, theta1, theta2


def test_ewc_keeps_one_penalty_per_task():
    m, theta1, theta2 = _consolidate_two_tasks(EWC, {"lambda_ewc": 4.0})
    assert len(m.terms) == 2
    params = dict(m.net.named_parameters())
    hand = sum(1.0 * ((params[n] - t) ** 2).sum() for n, t in theta1.items())  # task 1: its anchor, F = 1
    hand = hand + sum(3.0 * ((params[n] - t) ** 2).sum() for n, t in theta2.items())  # task 2, F = 3
    assert m.penalty().item() == pytest.approx(4.0 / 2 * hand.item())
    assert "head.blocks.1.weight" not in m.terms[0][1]  # the rows of task 2 did not exist at task 1


def test_online_ewc_keeps_one_running_fisher_and_the_latest_anchor():
    m, _, theta2 = _consolidate_two_tasks(OnlineEWC, {"lambda_ewc": 4.0, "gamma": 0.5})
    assert len(m.terms) == 1
    anchor, running = m.terms[0]
    torch.testing.assert_close(running["head.blocks.0.weight"], torch.full((2, 3), 0.5 * 1.0 + 3.0))  # gamma F1 + F2
    torch.testing.assert_close(running["head.blocks.1.weight"], torch.full((2, 3), 3.0))  # new rows: F2 only
    assert all(torch.equal(anchor[n], theta2[n]) for n in anchor)
    params = dict(m.net.named_parameters())
    hand = sum((running[n] * (params[n] - theta2[n]) ** 2).sum() for n in running)
    assert m.penalty().item() == pytest.approx(4.0 * 0.5 / 2 * hand.item())  # (lambda/2) gamma F*


def test_new_head_rows_have_no_penalty():
    m, _ = _linear(EWC, blocks=(2,))
    m.after_task(Task(0, 0, 2))
    m.net.add_classes(2)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    m.penalty().backward()
    old, new = m.net.head.blocks
    assert new.weight.grad is None and new.bias.grad is None
    assert old.weight.grad.abs().sum() > 0


def test_loss_is_ce_over_every_seen_class_plus_the_penalty():
    m, x = _linear(EWC)
    y = torch.tensor([0, 3, 1, 2])
    ce = F.cross_entropy(m.net(x[:4])["logits"], y)
    assert m.loss(x[:4], y).item() == pytest.approx(ce.item())  # first task: no penalty
    m.after_task(Task(0, 0, 4))
    with torch.no_grad():
        m.net.head.blocks[0].weight.add_(0.3)
    ce = F.cross_entropy(m.net(x[:4])["logits"], y)
    assert m.loss(x[:4], y).item() == pytest.approx(ce.item() + m.penalty().item())
    assert m.penalty().item() > 0


# -- SI ----------------------------------------------------------------------------------------------


class Scalar(nn.Module):
    """One parameter theta; ``add_classes`` adds nothing (a stand-in network for a loss of theta only)."""

    def __init__(self, theta0: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta0))

    def add_classes(self, n):
        pass


class QuadraticSI(SI):
    """SI whose task loss is (a/2)(theta - m)^2 (``self.target`` is m)."""

    a, target = 2.0, 0.0

    def task_loss(self, x, y):
        return 0.5 * self.a * (self.net.theta - self.target) ** 2


def _sgd(steps, lr):
    """A fit that takes ``steps`` plain gradient steps (no momentum), calling the step hooks as the loop does."""

    def fit(groups, indices, stage, loss, before_step, after_step, **_):
        params = [p for g in groups for p in g["params"]]
        for _ in range(steps):
            for p in params:
                p.grad = None
            loss(None, None).backward()
            before_step()
            with torch.no_grad():
                for p in params:
                    p.sub_(lr * p.grad)
            after_step()
        return {"images": 0, "seconds": 0.0, "images_per_s": 0.0}

    return fit


def _run_si_task(m, index, target):
    m.target = target
    task = Task(index, 2 * index, 2 * index + 2)
    m.task = task
    m.grow(task)
    m.before_task(task)
    m.fit(m.param_groups(task), torch.arange(1), m.stage(task), m.loss)
    m.after_task(task)


@pytest.mark.parametrize("omega_grad", ["task", "total"])
def test_si_path_integral_on_a_quadratic_by_hand(omega_grad):
    a, lr, K, c, xi, theta0, m1, m2 = 2.0, 0.1, 30, 0.7, 1e-3, 3.0, 1.0, -2.0
    m = QuadraticSI(QuadraticSI.parse_args({"c": c, "xi": xi, "omega_grad": omega_grad}), Scalar(theta0), FakeContext(fit=_sgd(K, lr)))

    # task 1, no surrogate: theta_k - m1 = r^k (theta0 - m1), r = 1 - lr a; omega = sum_k lr g_k^2 (a geometric series)
    _run_si_task(m, 0, m1)
    r = 1 - lr * a
    omega1 = lr * a**2 * (theta0 - m1) ** 2 * (1 - r ** (2 * K)) / (1 - r**2)
    theta1 = m1 + r**K * (theta0 - m1)
    big1 = omega1 / ((theta1 - theta0) ** 2 + xi)
    anchor, importance = m.terms[0]
    assert anchor["theta"].item() == pytest.approx(theta1, rel=1e-5)
    assert importance["theta"].item() == pytest.approx(big1, rel=1e-4)
    # the path integral is close to the loss decrease L(theta0) - L(theta1) (exact in the small-step limit)
    assert omega1 == pytest.approx(0.5 * a * ((theta0 - m1) ** 2 - (theta1 - m1) ** 2), rel=lr * a)

    # task 2, with the surrogate c Omega (theta - theta1)^2: g is the task loss's gradient (or the total one)
    _run_si_task(m, 1, m2)
    theta, omega2 = theta1, 0.0
    for _ in range(K):
        g_task = a * (theta - m2)
        g_total = g_task + 2 * c * big1 * (theta - theta1)
        step = -lr * g_total
        omega2 += -(g_task if omega_grad == "task" else g_total) * step
        theta += step
    anchor, importance = m.terms[0]
    assert anchor["theta"].item() == pytest.approx(theta, rel=1e-5)
    assert importance["theta"].item() == pytest.approx(big1 + omega2 / ((theta - theta1) ** 2 + xi), rel=1e-4)


def test_si_importances_cover_new_rows_from_their_initialisation():
    m, x = _linear(SI, blocks=(2,))
    y = m.ctx.train_data.labels % 2
    m.ctx._fit = _sgd(5, 0.5)
    m.loss = lambda xb, yb: m.task_loss(x, y) + (m.penalty() if m.terms else 0.0)  # a whole-batch loss for the stand-in fit
    for t in range(2):
        task = Task(t, 2 * t, 2 * t + 2)
        if t:
            m.net.add_classes(2)
        m.before_task(task)
        m.fit(m.param_groups(task), torch.arange(1), m.stage(task), m.loss)
        m.after_task(task)
    _, omega = m.terms[0]
    assert set(omega) == {"head.blocks.0.weight", "head.blocks.0.bias", "head.blocks.1.weight", "head.blocks.1.bias"}
    assert all(torch.isfinite(w).all() for w in omega.values())


# -- MAS ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_norm", ["squared", "l2"])
def test_mas_importance_of_a_one_layer_model_by_hand(output_norm):
    m, x = _linear(MAS, {"output_norm": output_norm})
    omega = m.importance(Task(1, 0, 4))
    w, b = _wb(m.net)
    z = x @ w.T + b
    dz = 2 * z if output_norm == "squared" else z / z.norm(dim=1, keepdim=True)  # d ||z||^2 / dz, d ||z|| / dz
    hand_w = (dz[:, :, None] * x[:, None, :]).abs().mean(0)  # mean over samples of |d / d W|
    hand_b = dz.abs().mean(0)
    for name, value in _by_block(m.net, hand_w, hand_b).items():
        torch.testing.assert_close(omega[name], value)
    batch = (dz[:, :, None] * x[:, None, :]).mean(0).abs()  # the magnitude of the mean gradient is smaller
    assert (batch <= hand_w + 1e-6).all() and not torch.allclose(batch, hand_w)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_mas_accumulates_importances_over_tasks(alpha):
    m, _ = _linear(MAS, {"alpha": alpha}, blocks=(2,))
    given = iter([{n: torch.full_like(p, 2.0) for n, p in m.trainable().items()}, None])
    m.importance = lambda task: next(given)
    m.after_task(Task(0, 0, 2))
    m.net.add_classes(2)
    given = iter([{n: torch.full_like(p, 8.0) for n, p in m.trainable().items()}])
    m.importance = lambda task: next(given)
    m.after_task(Task(1, 2, 4))
    (anchor, omega), = m.terms
    old, new = omega["head.blocks.0.weight"], omega["head.blocks.1.weight"]
    if alpha is None:  # the official code's sum
        assert torch.all(old == 10.0) and torch.all(new == 8.0)
    else:  # FACIL's fusion from a zero start: alpha ((1 - alpha) 2) + (1 - alpha) 8
        assert torch.allclose(old, torch.tensor(0.25 * 0.75 * 2.0 + 0.75 * 8.0)) and torch.allclose(new, torch.tensor(0.75 * 8.0))
    assert torch.equal(anchor["head.blocks.1.weight"], m.net.head.blocks[1].weight.detach())


# -- state, config, resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [EWC, OnlineEWC, MAS, SI])
def test_state_is_tensors_that_load_with_weights_only(cls, tmp_path):
    m, _ = _linear(cls, blocks=(2,))
    if cls is SI:
        m.before_task(Task(0, 0, 2))
        m.omega = {n: torch.ones_like(w) for n, w in m.omega.items()}  # as if the task had been trained
    m.after_task(Task(0, 0, 2))
    m.net.add_classes(2)
    with torch.no_grad():
        m.net.head.blocks[0].weight.add_(0.2)
    torch.save(m.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh, _ = _linear(cls, blocks=(2, 2))
    fresh.net.load_state_dict(m.net.state_dict())
    fresh.load_state_dict(state)
    assert fresh.penalty().item() == pytest.approx(m.penalty().item()) and m.penalty().item() > 0


@pytest.mark.parametrize("method, args, field", [
    ("ewc", {"lambda_ewc": -1.0}, "method_args.lambda_ewc"),
    ("ewc", {"fisher": "true"}, "method_args.fisher"),
    ("ewc", {"fisher_samples": 0}, "method_args.fisher_samples"),
    ("oewc", {"gamma": 1.5}, "method_args.gamma"),
    ("si", {"xi": 0.0}, "method_args.xi"),
    ("si", {"omega_grad": "reg"}, "method_args.omega_grad"),
    ("mas", {"alpha": 2.0}, "method_args.alpha"),
    ("mas", {"lambda_mas": -0.5}, "method_args.lambda_mas"),
])
def test_bad_values_are_config_errors(method, args, field):
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": method, "method_args": args}])
    assert e.value.field == field


@pytest.mark.parametrize("method", ["ewc", "oewc", "si", "mas"])
def test_exemplar_free_a_budget_is_refused(method):
    with pytest.raises(ConfigError, match="keeps no exemplars"):
        cilkit.resolve([{"method": method, "memory": {"size": 100}}])


@pytest.mark.parametrize("method", ["ewc", "oewc", "si", "mas"])
def test_resumed_run_equals_the_uninterrupted_run(method, run_cut_and_resumed):
    args = {"fisher_samples": 100} if method in ("ewc", "oewc") else {}
    full, partial, resumed = run_cut_and_resumed(tiny_cfg(method, args), cut_at=2)
    assert len(partial["tasks"]) == 2 and len(resumed["tasks"]) == len(full["tasks"]) > 2
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]
    assert all(math.isfinite(v) for v in full["summary"].values())
