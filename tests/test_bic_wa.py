"""BiC (bias correction) and WA (weight aligning): the mechanics on hand-made tensors, and a smoke run."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALL_CONVNET, FixedLogits, assert_complete_run, open_task, smoke_run, tiny_driver

from cilkit.data.scenario import Task
from cilkit.experiment import build_driver
from cilkit.losses import kd_loss
from cilkit.methods.base import Teacher
from cilkit.methods.bic import BiasCorrectedNet, BiasLayers, BiC
from cilkit.training.stage import Stage

# a convnet (BatchNorm, for the stage-2 checks), one epoch a task
TRAIN = {"epochs": 1, "batch_size": 64}


def _driver(method, method_args=None, **sections):
    return tiny_driver(method, method_args, **{"model": SMALL_CONVNET, "train": TRAIN, **sections})


def _record_fits(m):
    """Record the keyword arguments of every ``fit`` call the method makes (and still run it)."""
    calls, fit = [], m.ctx.fit

    def recording(groups, indices, stage, loss, **hooks):
        calls.append({"groups": groups, "stage": stage, **hooks})
        return fit(groups, indices, stage, loss, **hooks)

    m.ctx.fit = recording
    return calls


@pytest.fixture(scope="module")
def bic_after_task0():
    """The checkpoint of a BiC run after its first task (30 exemplars a class)."""
    d = _driver("bic")
    d.run_task(d.scenario.tasks[0])
    return d.state_dict()


def _bic_at_task1(state, method_args=None):
    d = _driver("bic", method_args)
    d.load_state_dict(state)  # replays grow(), as a resume does
    return d, open_task(d, 1)


# -- BiC -----------------------------------------------------------------------------------------


def test_bias_layer_changes_only_its_own_task_columns():
    b = BiasLayers("all")
    b.add_task(2)
    b.add_task(3)
    o = torch.randn(4, 5)
    assert torch.equal(b(o), o)  # (1, 0) pairs: the identity
    with torch.no_grad():
        b.alpha[1].fill_(2.5)
        b.beta[1].fill_(-0.75)
    q = b(o)
    assert torch.equal(q[:, :2], o[:, :2])  # the old columns are untouched
    torch.testing.assert_close(q[:, 2:], 2.5 * o[:, 2:] - 0.75)
    b.add_task(1)
    with torch.no_grad():
        b.alpha[2].fill_(-1.0)
        b.beta[2].fill_(3.0)
    o = torch.randn(4, 6)
    q = b(o)
    assert torch.equal(q[:, :2], o[:, :2])
    torch.testing.assert_close(q[:, 2:5], 2.5 * o[:, 2:5] - 0.75)  # each block keeps its own pair
    torch.testing.assert_close(q[:, 5:], 3.0 - o[:, 5:])


def test_only_the_newest_pair_corrects_by_default():
    """Eq. 4 of the paper: q_k = o_k for the old classes, alpha o_k + beta for the newest task's."""
    b = BiasLayers()
    b.add_task(2)
    b.add_task(3)
    with torch.no_grad():
        b.alpha[1].fill_(2.5)
        b.beta[1].fill_(-0.75)
    o = torch.randn(4, 5)
    q = b(o)
    assert torch.equal(q[:, :2], o[:, :2])
    torch.testing.assert_close(q[:, 2:], 2.5 * o[:, 2:] - 0.75)
    b.add_task(1)  # a new task: its pair (1, 0) is the only one applied, every older block is raw
    o = torch.randn(4, 6)
    assert torch.equal(b(o), o)
    with torch.no_grad():
        b.alpha[2].fill_(-1.0)
        b.beta[2].fill_(3.0)
    q = b(o)
    assert torch.equal(q[:, :5], o[:, :5])
    torch.testing.assert_close(q[:, 5:], 3.0 - o[:, 5:])


def test_lambda_is_old_over_seen_classes():
    for task, lam in [(Task(1, 2, 4), 0.5), (Task(2, 4, 6), 4 / 6), (Task(4, 8, 10), 0.8)]:
        assert task.old_fraction == pytest.approx(lam)


def test_validation_set_is_balanced_and_left_out_of_stage_1(bic_after_task0):
    d, task = _bic_at_task1(bic_after_task0)
    m, data = d.method, d.runtime.train_data
    V = m.val_idx.cpu()
    counts = torch.bincount(data.labels.cpu()[V], minlength=4)
    assert counts.tolist() == [3, 3, 3, 3]  # 30 exemplars an old class, split 9:1; as many per new class
    old_v = V[data.labels.cpu()[V] < 2]
    assert torch.isin(old_v, d.memory.indices()).all()  # old-class V comes from the exemplars
    train = m.train_indices(task).cpu()
    assert not torch.isin(train, V).any()
    everything = torch.cat([data.indices_of(task.classes).cpu(), d.memory.indices()])
    assert sorted(torch.cat([train, V]).tolist()) == sorted(everything.tolist())


def test_validation_rules_paper_and_pycil():
    d = _driver("bic", memory={"per_class": 25, "size": 200})
    m = d.method
    m.task = Task(1, 2, 4)
    d.memory.exemplars = {0: torch.arange(25), 1: torch.arange(100, 125)}
    assert m.val_per_class(m.task) == 2  # a tenth of the 25 exemplars held per old class
    fixed_total = _driver("bic", {"val_split": "pycil"}, memory={"size": 200}).method
    fixed_total.task = m.task
    assert fixed_total.val_per_class(m.task) == 10  # int(0.1 * 200 / 2)


def test_pycil_validation_rule_divides_the_configured_total_under_a_per_class_memory():
    d = _driver("bic", {"val_split": "pycil"}, memory={"per_class": 25, "size": 200})
    m = d.method
    m.task = Task(1, 2, 4)
    d.memory.exemplars = {0: torch.arange(25), 1: torch.arange(100, 125)}
    assert m.val_per_class(m.task) == 10  # int(0.1 * 200 / 2): PyCIL divides the total budget


def test_stage_1_leaves_every_bias_pair_alone(bic_after_task0):
    d, task = _bic_at_task1(bic_after_task0)
    m = d.method
    grouped = {id(p) for g in m.param_groups(task) for p in g["params"]}
    assert not grouped & {id(p) for p in m.bias.parameters()}
    assert grouped == {id(p) for p in d.net.parameters()}
    m.fit(m.param_groups(task), m.train_indices(task)[:128], Stage(epochs=1, lr=0.1, batch_size=32), m.loss)
    assert [p.item() for p in m.bias.alpha] == [1.0, 1.0] and [p.item() for p in m.bias.beta] == [0.0, 0.0]


def test_stage_2_updates_only_alpha_and_beta(bic_after_task0):
    d, task = _bic_at_task1(bic_after_task0, {"stage2_epochs": 3, "stage2_lr": 0.5})
    m = d.method
    with torch.no_grad():  # pretend the first task's pair had moved: it must stay frozen
        m.bias.alpha[0].fill_(1.5)
    before = {k: v.clone() for k, v in d.net.state_dict().items()}  # BatchNorm statistics included
    fits = _record_fits(m)
    m.correct_bias(task)
    for k, v in d.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.bias.alpha[0].item() == 1.5 and m.bias.beta[0].item() == 0.0
    assert m.bias.alpha[1].item() != 1.0 and m.bias.beta[1].item() != 0.0
    (fit,) = fits
    assert [id(p) for g in fit["groups"] for p in g["params"]] == [id(m.bias.alpha[1]), id(m.bias.beta[1])]
    assert fit["stage"].epochs == 3 and fit["stage"].lr == 0.5
    m.train_mode()  # stage 1's mode, then the one stage 2 passes to the loop
    fit["train_mode"]()
    assert not any(mod.training for mod in d.net.modules())  # BatchNorm frozen in stage 2 ...
    m.hp = dataclasses.replace(m.hp, stage2_bn_train=True)
    fit["train_mode"]()
    assert all(mod.training for mod in d.net.modules())  # ... unless PyCIL's behaviour is asked for


def test_stage_2_loss_is_plain_cross_entropy_on_corrected_logits():
    m = _driver("bic").method
    for t in (Task(0, 0, 2), Task(1, 2, 3)):
        m.bias.add_task(t.n_classes)
    with torch.no_grad():
        m.bias.alpha[1].fill_(0.5)
        m.bias.beta[1].fill_(-1.0)
    o = torch.tensor([[2.0, 0.0, 4.0], [1.0, 3.0, 2.0]])
    y = torch.tensor([2, 1])
    m.net = lambda x: {"logits": o}
    q = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, 0.0]])
    expected = -(math.log(math.exp(1) / (math.exp(2) + 1 + math.exp(1))) + math.log(math.exp(3) / (math.exp(1) + math.exp(3) + 1))) / 2
    assert m.stage2_loss(None, y).item() == pytest.approx(expected, rel=1e-5)
    m.hp = dataclasses.replace(m.hp, stage2_double_softmax=True)
    assert m.stage2_loss(None, y).item() == pytest.approx(F.cross_entropy(F.softmax(q, 1), y).item(), rel=1e-5)
    assert m.stage2_loss(None, y).item() != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("pairs", ["newest", "all"])
def test_kd_targets_are_the_teachers_corrected_logits(pairs, bic_after_task0):
    d = _driver("bic", {"bias_pairs": pairs})
    d.load_state_dict(bic_after_task0)
    m, rt = d.method, d.runtime
    with torch.no_grad():  # give the old block a non-trivial correction before the teacher copy
        m.bias.alpha[0].fill_(2.0)
        m.bias.beta[0].fill_(0.5)
    open_task(d, 1)
    assert isinstance(m.teacher.module, BiasCorrectedNet)  # the previous model with its bias layers
    d.net.eval()
    x, y = rt.train_data.batch(m.train_indices(m.task)[:16])
    x = rt.augment.test(x)
    raw = d.net(x)["logits"].detach()
    q = raw.clone()
    if pairs == "all":
        q[:, :2] = 2.0 * raw[:, :2] + 0.5  # PyCIL: the student's old block carries the frozen pair too
    q_hat = 2.0 * raw[:, :2] + 0.5  # teacher = previous model with its (then newest) bias pair
    lam = 0.5
    expected = lam * kd_loss(q[:, :2], q_hat, 2.0) + (1 - lam) * F.cross_entropy(q, y)
    got = m.loss(x, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    uncorrected = lam * kd_loss(q[:, :2], raw[:, :2], 2.0) + (1 - lam) * F.cross_entropy(q, y)
    assert got.item() != pytest.approx(uncorrected.item(), rel=1e-3)


# -- WA ------------------------------------------------------------------------------------------


def test_wa_head_is_bias_free_unless_asked():
    d = _driver("wa")
    open_task(d, 0)
    assert d.net.head.blocks[0].bias is None
    d = _driver("wa", {"fc_bias": True})
    open_task(d, 0)
    assert d.net.head.blocks[0].bias is not None


def test_wa_lambda_and_kd_by_hand():
    m = _driver("wa").method
    m.task = Task(1, 2, 3)
    assert m.task.old_fraction == pytest.approx(2 / 3)
    m.net = FixedLogits(torch.tensor([[1.0, 2.0, 0.5]]))
    m.teacher = Teacher(FixedLogits(torch.tensor([[2.0, 0.0, 9.0]])))  # the new column must be ignored
    y = torch.tensor([2])
    e = math.exp
    p = [e(1) / (e(1) + 1), 1 / (e(1) + 1)]  # softmax([2, 0] / 2)
    log_s = [0.5 - math.log(e(0.5) + e(1)), 1.0 - math.log(e(0.5) + e(1))]  # log_softmax([1, 2] / 2)
    kd = -(p[0] * log_s[0] + p[1] * log_s[1])
    ce = -(0.5 - math.log(e(1) + e(2) + e(0.5)))
    assert m.loss(None, y).item() == pytest.approx(ce / 3 + 2 * kd / 3, rel=1e-6)


def _head_with_norms(d):
    m = d.method
    for index in (0, 1):
        open_task(d, index)
    dim = d.net.feature_dim
    w0, w1 = torch.zeros(2, dim), torch.zeros(2, dim)
    w0[0, :2] = torch.tensor([3.0, 4.0])  # norm 5
    w0[1, 0] = 1.0  # norm 1: old mean 3
    w1[0, 2] = 6.0
    w1[1, 3] = 12.0  # new mean 9
    with torch.no_grad():
        m.net.head.blocks[0].weight.copy_(w0)
        m.net.head.blocks[1].weight.copy_(w1)
    return m, w0


def test_wa_alignment_equalises_mean_norms_before_the_memory_update():
    m, w0 = _head_with_norms(_driver("wa", {"fc_bias": True}))
    bias = m.net.head.blocks[1].bias.detach().clone()
    seen = []
    m.update_memory = lambda task: seen.append(m.net.head.weight.norm(dim=1).clone())
    m.after_task(m.task)
    norms = seen[0]  # what herding sees: the aligned head
    assert m.gammas == [pytest.approx(1 / 3)]
    assert norms[:2].mean().item() == pytest.approx(norms[2:].mean().item())
    torch.testing.assert_close(norms[2:], torch.tensor([2.0, 4.0]))
    assert torch.equal(m.net.head.blocks[0].weight.detach(), w0)  # old rows untouched
    assert torch.equal(m.net.head.blocks[1].bias.detach(), bias)  # PyCIL's bias is not rescaled


def test_wa_teacher_of_the_next_task_is_the_aligned_model():
    d = tiny_driver("wa")
    for task in d.scenario.tasks[:2]:
        d.run_task(task)
    assert d.method.teacher is None and len(d.method.gammas) == 1  # dropped at the end of the task
    open_task(d, 2)
    norms = d.method.teacher.module.head.weight.norm(dim=1)[:4]  # the model after task 1, aligned
    assert norms[:2].mean().item() == pytest.approx(norms[2:4].mean().item(), rel=1e-5)


@pytest.mark.parametrize("clip", [True, False])
def test_wa_weight_clipping_after_each_step(clip):
    torch.manual_seed(0)
    d = _driver("wa", {"clip_weights": clip})
    m = d.method
    task = open_task(d, 0)
    idx = d.runtime.train_data.indices_of(task.classes)[:64]
    m.fit(m.param_groups(task), idx, Stage(epochs=1, lr=0.5, batch_size=32), m.loss)  # with the method's after_step
    w = m.net.head.weight
    if clip:
        assert (w >= 0).all() and (w == 0).any()
    else:
        assert (w < 0).any()


# -- smoke runs ----------------------------------------------------------------------------------


def test_bic_smoke_run_and_state_round_trip(tmp_path, monkeypatch):
    teachers = []  # the teacher of every task, as the driver made it
    original = BiC.end_task

    def recording(self, task):
        teachers.append((type(self.teacher.module), [p.item() for p in self.teacher.module.bias.alpha]) if self.teacher else None)
        return original(self, task)

    monkeypatch.setattr(BiC, "end_task", recording)
    metrics, exp = smoke_run(tmp_path, "bic")
    assert_complete_run(metrics, nme=True)
    m = exp.method
    alphas = [p.item() for p in m.bias.alpha]
    assert len(alphas) == 2 and alphas[0] == 1.0 and m.bias.beta[0].item() == 0.0  # no correction of the first task
    assert all(math.isfinite(a) and a != 1.0 for a in alphas[1:])
    assert teachers == [None, (BiasCorrectedNet, [1.0, 1.0])]  # the teacher kept its bias layers
    assert m.teacher is None  # dropped after the task
    other = build_driver(exp.cfg, exp.scenario, progress="off")
    state = exp.driver.state_dict()
    other.load_state_dict(state)
    assert other.net.state_dict().keys() == exp.driver.net.state_dict().keys()
    assert other.method.state_dict().keys() == m.state_dict().keys() == state["method"].keys()
    assert [p.item() for p in other.method.bias.alpha] == alphas
    x = exp.runtime.augment.test(exp.runtime.test_data.batch(torch.arange(32))[0])
    exp.driver.net.eval()
    other.net.eval()
    torch.testing.assert_close(other.method.inference(x)["logits"], m.inference(x)["logits"])


def test_wa_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "wa")
    assert_complete_run(metrics, nme=True)
    m = exp.method
    assert len(m.gammas) == 1
    norms = m.net.head.weight.norm(dim=1)  # the model after task 1, aligned
    assert norms[:5].mean().item() == pytest.approx(norms[5:].mean().item(), rel=1e-5)
