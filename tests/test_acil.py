"""ACIL and DS-AL: the recursion equals the joint least-squares solution, the fixed buffer layer, the
compensation stream on a hand-made case, the frozen backbone, resume, and digits runs against finetune."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, tiny_cfg

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.experiment import Experiment
from cilkit.methods.acil import ACIL, DSAL
from cilkit.models.analytic import RandomBuffer, RecursiveLeastSquares, ridge_solution, row_blocks
from cilkit.models.network import build_network
from cilkit.presets import load_yaml

TASKS = [Task(0, 0, 3), Task(1, 3, 5), Task(2, 5, 8)]  # three tasks of 3, 2 and 3 classes


def _data(n_per_class=7, dim=6, n_classes=8, seed=0):
    """Hand-made 'backbone features' (one row per training index) and their labels, class-sorted."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    centres = torch.randn(n_classes, dim, generator=g) * 2
    feats = centres[labels] + torch.randn(len(labels), dim, generator=g)
    return feats, labels


def _method(cls, feats, labels, seed=0, **hp):
    """A method whose context serves ``feats[idx]`` as the eval-mode features of the training indices ``idx``."""
    def indices_of(classes):
        return torch.nonzero(torch.isin(labels, torch.tensor(list(classes)))).flatten()

    data = types.SimpleNamespace(labels=labels, indices_of=indices_of)
    ctx = FakeContext(train_data=data, seed=seed, features=lambda idx, forward, **kw: feats[idx])
    torch.manual_seed(0)  # the same backbone for every method built here (inference runs it)
    net = build_network("mlp", (1, 2, 3), hidden=[feats.shape[1]])  # feature_dim = dim; after_task reads `feats`
    return cls(cls.parse_args(hp), net, ctx)


def _run_tasks(m, tasks):
    for task in tasks:
        m.task = task
        m.grow(task)
        m.before_task(task)
        m.after_task(task)


# -- the recursion is the joint solution ------------------------------------------------------------


@pytest.mark.parametrize("batch", [None, 1, 4])
def test_recursive_least_squares_over_tasks_equals_the_joint_solution(batch):
    """ACIL's absolute memorization: blocks of new classes, one task at a time, give the joint ridge weights."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    labels = torch.arange(8).repeat_interleave(5)
    rls = RecursiveLeastSquares(12, gamma=0.1)
    for task in TASKS:
        rows = (labels >= task.start) & (labels < task.stop)
        rls.add_classes(task.n_classes)
        rls.fit(X[rows], F.one_hot(labels[rows], task.stop).double(), batch=batch)
    joint = ridge_solution(X, F.one_hot(labels, 8), 0.1)
    assert rls.weight.dtype == rls.R.dtype == torch.float64
    torch.testing.assert_close(rls.weight, joint, rtol=0, atol=1e-10)
    A = X.T @ X + 0.1 * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(rls.R, torch.linalg.inv(A), rtol=0, atol=1e-10)


def test_first_block_is_the_closed_form_and_targets_must_cover_every_class():
    X = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], dtype=torch.float64)
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    rls = RecursiveLeastSquares(2, gamma=2.0)
    assert torch.equal(rls.R, torch.eye(2, dtype=torch.float64) / 2.0) and rls.n_classes == 0
    rls.add_classes(2)
    rls.update(X, Y)
    expected = torch.linalg.solve(X.T @ X + 2.0 * torch.eye(2, dtype=torch.float64), X.T @ Y)  # ACIL Eq. 4
    torch.testing.assert_close(rls.weight, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        rls.update(X, Y[:, :1])
    assert row_blocks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)] and row_blocks(3, None) == [slice(0, 3)]


@pytest.mark.parametrize("rls_batch", [4096, 5])
def test_acil_over_three_tasks_equals_joint_least_squares_on_all_the_data(rls_batch):
    feats, labels = _data()
    m = _method(ACIL, feats, labels, buffer_size=32, rls_batch=rls_batch)
    _run_tasks(m, TASKS)
    X = torch.relu(feats.double() @ m.net.analytic["buffer"].weight)  # act(f W_fe) of every sample seen
    joint = ridge_solution(X, F.one_hot(labels, 8), m.hp.gamma)
    torch.testing.assert_close(m.net.analytic["main"].weight, joint, rtol=0, atol=1e-9)
    out = m.inference(torch.zeros(3, 1, 2, 3))
    assert out["logits"].shape == (3, 8) and out["logits"].dtype == torch.float32


# -- the buffer layer ------------------------------------------------------------------------------


def test_buffer_layer_is_seeded_fixed_and_in_the_checkpoint():
    feats, labels = _data()
    a, b, c = (_method(ACIL, feats, labels, seed=s, buffer_size=16) for s in (0, 0, 1))
    wa = a.net.analytic["buffer"].weight
    assert wa.shape == (6, 16) and wa.dtype == torch.float64
    assert torch.equal(wa, b.net.analytic["buffer"].weight) and not torch.equal(wa, c.net.analytic["buffer"].weight)
    assert not any(p is wa for p in a.net.parameters())  # a buffer, never trained
    before = wa.clone()
    _run_tasks(a, TASKS[:2])
    assert torch.equal(a.net.analytic["buffer"].weight, before)
    state = a.net.state_dict()
    assert {"analytic.buffer.weight", "analytic.main.weight", "analytic.main.R"} <= state.keys()
    fresh = _method(ACIL, feats, labels, seed=7, buffer_size=16)  # another seed: the checkpoint wins
    for t in TASKS[:2]:
        fresh.task = t
        fresh.grow(t)  # what the driver replays on resume, before loading
    fresh.net.load_state_dict(state)
    x = torch.randn(4, 1, 2, 3)
    assert torch.equal(fresh.inference(x)["logits"], a.inference(x)["logits"])


def test_buffer_inits_paper_normal_and_code_uniform():
    normal = RandomBuffer(512, 256, init="normal", seed=3).weight
    assert abs(normal.mean().item()) < 0.01 and normal.std().item() == pytest.approx(1.0, abs=0.01)
    uniform = RandomBuffer(64, 2000, init="uniform", seed=3).weight
    assert uniform.abs().max() <= 1 / 8 and uniform.abs().max() > 0.99 / 8  # U(-1/sqrt(64), 1/sqrt(64)): nn.Linear's init
    with pytest.raises(ValueError):
        RandomBuffer(4, 4, init="orthogonal")


# -- the task loop --------------------------------------------------------------------------------


def test_backbone_trained_on_the_first_task_only():
    feats, labels = _data()
    m = _method(ACIL, feats, labels, buffer_size=8)
    assert m.stage(TASKS[0]).epochs == m.ctx.stage(TASKS[0]).epochs == 1  # the config's schedule: BP base training
    assert m.stage(TASKS[1]).epochs == 0 and m.stage(TASKS[2]).lr == m.ctx.stage(TASKS[2]).lr
    _run_tasks(m, TASKS[:1])
    assert all(p.requires_grad for p in m.net.backbone.parameters())
    m.task = TASKS[1]
    m.grow(TASKS[1])
    m.before_task(TASKS[1])
    assert not any(p.requires_grad for p in m.net.backbone.parameters())
    assert m.param_groups(TASKS[1])[0]["params"]  # the loop's optimizer has something to hold (it steps nothing)


def test_exemplar_free_and_the_defaults_are_the_papers():
    for name in ("acil", "ds-al"):
        with pytest.raises(ConfigError) as e:
            cilkit.resolve([{"method": name, "memory": {"size": 100}}])
        assert e.value.field == "memory.size"
        assert cilkit.resolve([{"method": name}]).method == name
    hp = ACIL.parse_args({})
    assert (hp.buffer_size, hp.gamma, hp.activation, hp.buffer_init) == (8192, 0.1, "relu", "normal")
    hp = DSAL.parse_args({})
    assert (hp.gamma_comp, hp.compensation_ratio, hp.activation_comp, hp.residue) == (0.1, 1.0, "tanh", "task")
    with pytest.raises(ConfigError):
        ACIL.parse_args({"gamma": 0})


# -- DS-AL --------------------------------------------------------------------------------------------


def _scalar_dsal(**hp):
    """DS-AL on 1-d features with the buffer set to the identity: every stream is a scalar ridge regression."""
    feats = torch.tensor([[2.0], [1.0]])
    m = _method(DSAL, feats, torch.tensor([0, 1]), buffer_size=1, gamma=1.0, gamma_comp=1.0, **hp)
    m.net.analytic["buffer"].weight.fill_(1.0)
    return m


def test_compensation_stream_by_hand():
    """Task 1: x = 2 of class 0; task 2: x = 1 of class 1; gamma = 1 in both streams; ReLU / tanh."""
    t0, t1 = Task(0, 0, 1), Task(1, 1, 2)
    m = _scalar_dsal(compensation_ratio=0.6)
    _run_tasks(m, [t0])
    # main: (4 + 1)^-1 * 2 = 0.4; residue 1 - 2 * 0.4 = 0.2; comp: tanh(2) * 0.2 / (tanh(2)^2 + 1)
    th2, th1 = math.tanh(2.0), math.tanh(1.0)
    assert m.net.analytic["main"].weight.item() == pytest.approx(0.4, abs=1e-12)
    assert m.net.analytic["comp"].weight.item() == pytest.approx(th2 * 0.2 / (th2**2 + 1), abs=1e-12)
    _run_tasks(m, [t1])
    # main, joint: [2, 1] / (4 + 1 + 1) = [1/3, 1/6]; the new sample's residue [0, 1] - [1/3, 1/6] = [-1/3, 5/6],
    # cleansed to [0, 5/6] (previous label cleansing); comp, joint over the targets [0.2, 0] and [0, 5/6]
    torch.testing.assert_close(m.net.analytic["main"].weight, torch.tensor([[1 / 3, 1 / 6]], dtype=torch.float64))
    a = th2**2 + th1**2 + 1
    comp = torch.tensor([[th2 * 0.2 / a, th1 * (5 / 6) / a]], dtype=torch.float64)
    torch.testing.assert_close(m.net.analytic["comp"].weight, comp)
    # without the cleansing the old column would have taken tanh(1) * (-1/3): it did not
    assert m.net.analytic["comp"].weight[0, 0].item() != pytest.approx((th2 * 0.2 - th1 / 3) / a)
    f = torch.tensor([[1.5], [-0.5]])
    expected = torch.relu(f.double()) @ torch.tensor([[1 / 3, 1 / 6]], dtype=torch.float64) + 0.6 * torch.tanh(f.double()) @ comp
    torch.testing.assert_close(m.analytic_logits(f), expected)


def test_residues_per_block_follow_the_official_code():
    """residue: task uses W_M after the whole task; batch (the code) the main stream after each block."""
    t0 = Task(0, 0, 1)
    task, batch = _scalar_dsal(), _scalar_dsal(residue="batch", rls_batch=1)
    m_feats = torch.tensor([[2.0], [1.0]])
    for m in (task, batch):
        m.ctx._features = lambda idx, forward, **kw: m_feats[idx]
        m.ctx.train_data.labels = torch.tensor([0, 0])
        m.ctx.train_data.indices_of = lambda classes: torch.tensor([0, 1])
        _run_tasks(m, [t0])
    torch.testing.assert_close(task.net.analytic["main"].weight, batch.net.analytic["main"].weight)
    # main after the whole task: (4 + 1 + 1)^-1 * 3 = 0.5; residues 1 - 2 * 0.5 = 0 and 1 - 0.5 = 0.5
    th2, th1, a = math.tanh(2.0), math.tanh(1.0), math.tanh(2.0) ** 2 + math.tanh(1.0) ** 2 + 1
    assert task.net.analytic["comp"].weight.item() == pytest.approx(th1 * 0.5 / a, abs=1e-12)
    # per block: after x = 2 alone W = 0.4, residue 0.2; after both 0.5, residue of x = 1: 0.5
    assert batch.net.analytic["comp"].weight.item() == pytest.approx((th2 * 0.2 + th1 * 0.5) / a, abs=1e-12)


def test_ds_al_with_no_compensation_is_acil():
    feats, labels = _data()
    acil = _method(ACIL, feats, labels, buffer_size=24)
    dsal = _method(DSAL, feats, labels, buffer_size=24, compensation_ratio=0.0)
    _run_tasks(acil, TASKS)
    _run_tasks(dsal, TASKS)
    x = torch.randn(5, 1, 2, 3)
    torch.testing.assert_close(dsal.inference(x)["logits"], acil.inference(x)["logits"])
    assert dsal.net.analytic["comp"].weight.abs().max() > 0 and "comp" not in acil.net.analytic
    dsal.hp.compensation_ratio = 1.0
    assert not torch.allclose(dsal.inference(x)["logits"], acil.inference(x)["logits"])


def test_ds_al_main_stream_is_the_joint_solution_too():
    feats, labels = _data(seed=2)
    m = _method(DSAL, feats, labels, buffer_size=20, rls_batch=6)
    _run_tasks(m, TASKS)
    z = feats.double() @ m.net.analytic["buffer"].weight
    torch.testing.assert_close(m.net.analytic["main"].weight, ridge_solution(torch.relu(z), F.one_hot(labels, 8), 0.1),
                               rtol=0, atol=1e-9)


# -- whole runs on digits -----------------------------------------------------------------------------

ARGS = {"buffer_size": 256}
THREE_TASKS = {"name": "B4-Inc3"}


@pytest.mark.parametrize("method", ["acil", "ds-al"])
def test_resume_after_task_1_equals_the_uninterrupted_three_task_run(method, run_cut_and_resumed, tmp_path):
    cfg = tiny_cfg(method, ARGS, scenario=THREE_TASKS)
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=1)
    assert len(partial["tasks"]) == 1 and len(full["tasks"]) == len(resumed["tasks"]) == 3
    assert full["tasks"][0]["train_images"] > 0 and full["tasks"][1]["train_images"] == full["tasks"][2]["train_images"] == 0
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "task_002.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "task_002.pt", weights_only=True)["net"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(tmp_path / "full" / "checkpoints" / "task_000.pt", weights_only=True)["net"]
    assert all(torch.equal(first[k], a[k]) for k in first if k.startswith("backbone."))  # frozen after the first task
    assert torch.equal(first["analytic.buffer.weight"], a["analytic.buffer.weight"])


def test_protocol_presets_are_exemplar_free_with_a_narrower_buffer():
    widths = {"digits": 1024, "fmnist": 2048, "tin32-cpu": 4096}
    for protocol, width in widths.items():
        for method in ("acil", "ds-al"):
            layer = load_yaml(f"protocols/{protocol}/{method}")
            assert layer["method"] == method and layer["memory"]["size"] is None
            assert layer["method_args"] == {"buffer_size": width}
    cfg = cilkit.resolve([load_yaml("protocols/digits/ds-al")])
    assert cfg.method == "ds-al" and cfg.memory.size is None and cfg.method_args == {"buffer_size": 1024}


def test_both_beat_finetune_on_digits(tmp_path):
    figures = {}
    for method in ("finetune", "acil", "ds-al"):
        cfg = tiny_cfg(method, ARGS if method != "finetune" else None)
        metrics = Experiment(cfg, tmp_path / method, progress="off").execute()
        figures[method] = metrics["summary"]["avg_incremental_accuracy"]
    assert figures["acil"] > figures["finetune"] + 20 and figures["ds-al"] > figures["finetune"] + 20, figures
