"""FOSTER: the class weights, the logits alignment and the balanced distillation on hand-made tensors;
the boosted model (frozen old extractor, copied classifier rows, auxiliary head), the compression into
the single-backbone network, the parameter and exemplar budgets per task, resume and an end-to-end run."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, tiny_cfg, tiny_driver

from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses import balanced_kd, effective_number_weights, kd_loss
from cilkit.methods.base import Teacher
from cilkit.methods.foster import FOSTER, BoostedNet, aligned_logits
from cilkit.models.network import build_network

# -- the shared losses ------------------------------------------------------------------------------


def test_effective_number_weights_by_hand():
    counts = torch.tensor([20, 20, 500])
    beta = 0.97
    raw = [(1 - beta) / (1 - beta**n) for n in (20, 20, 500)]  # 0.06502.., 0.06502.., 0.03
    expected = [3 * r / sum(raw) for r in raw]
    w = effective_number_weights(counts, beta)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert w.mean().item() == pytest.approx(1.0) and w[0] > 1 > w[2]  # the rare (old) classes weigh more
    assert effective_number_weights(torch.tensor([3, 7, 100]), 0.0).tolist() == [1.0, 1.0, 1.0]  # beta 0: uniform
    assert effective_number_weights(torch.tensor([50, 50]), 0.999).tolist() == pytest.approx([1.0, 1.0])


def test_effective_number_weights_refuse_empty_classes_and_bad_beta():
    with pytest.raises(ValueError, match="positive"):
        effective_number_weights(torch.tensor([0, 5]), 0.9)
    with pytest.raises(ValueError, match="beta"):
        effective_number_weights(torch.tensor([1, 5]), 1.0)


def test_balanced_kd_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    w = torch.tensor([2.0, 0.5, 0.5])
    T = 2.0
    p = [math.exp(v / T) for v in (0.0, 2.0, 0.0)]
    q = [wi * pi for wi, pi in zip(w.tolist(), p)]
    q = [v / sum(q) for v in q]
    log_s = F.log_softmax(s / T, dim=1)[0].tolist()
    expected = -sum(qi * li for qi, li in zip(q, log_s))
    assert balanced_kd(s, t, w, T).item() == pytest.approx(expected, rel=1e-6)
    # equal weights: plain KD (no T^2); the target is the reweighted teacher: the loss is smallest there
    assert balanced_kd(s, t, torch.ones(3), T).item() == pytest.approx(kd_loss(s, t, T).item(), rel=1e-6)
    target = torch.log(torch.tensor([q])) * T  # logits whose softened distribution is q
    student = target.clone().requires_grad_(True)
    balanced_kd(student, t, w, T).backward()
    assert student.grad.abs().max().item() < 1e-6
    assert balanced_kd(target, t, w, T) < balanced_kd(s, t, w, T)


def test_balanced_kd_reweights_toward_the_heavy_classes_and_detaches_the_teacher():
    t = torch.zeros(4, 3, requires_grad=True)  # a uniform teacher
    s = torch.zeros(4, 3, requires_grad=True)
    balanced_kd(s, t, torch.tensor([3.0, 1.0, 1.0]), 1.0).backward()
    assert t.grad is None
    # target q = (0.6, 0.2, 0.2) against the student's uniform 1/3: raise class 0, lower the others
    assert (s.grad[:, 0] < 0).all() and (s.grad[:, 1:] > 0).all()
    assert s.grad[0].tolist() == pytest.approx([(1 / 3 - 0.6) / 4, (1 / 3 - 0.2) / 4, (1 / 3 - 0.2) / 4], abs=1e-6)


# -- FOSTER's logits alignment --------------------------------------------------------------------------


def test_logits_alignment_divides_by_the_class_weights():
    z = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0]])
    w = torch.tensor([2.0, 0.5, 0.5])
    a = aligned_logits(z, w)
    assert a.tolist() == [[1.0, 2.0, 1.0], [0.0, 6.0, -2.0]]
    y = torch.tensor([0, 2])
    by_hand = -(math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(1.0)))
                + math.log(math.exp(-2.0) / (1 + math.exp(6.0) + math.exp(-2.0)))) / 2
    assert F.cross_entropy(a, y).item() == pytest.approx(by_hand, rel=1e-6)
    assert torch.equal(aligned_logits(z, torch.ones(3)), z)  # balanced data: the plain cross-entropy


def test_logits_alignment_pushes_the_rare_class_logit_up_harder():
    """With the old class (few samples, weight > 1) shrunk in training, a model must raise its raw logit
    further to reach the same training loss: at equal raw logits the aligned loss of an old-class sample
    is the larger, and its gradient toward the old logit too."""
    counts = torch.tensor([20, 500])
    w = effective_number_weights(counts, 0.96)
    z = torch.zeros(1, 2, requires_grad=True)
    F.cross_entropy(aligned_logits(z, w), torch.tensor([0])).backward()
    z_plain = torch.zeros(1, 2, requires_grad=True)
    F.cross_entropy(z_plain, torch.tensor([0])).backward()
    assert w[0] > 1 > w[1]
    assert -z.grad[0, 0] < -z_plain.grad[0, 0]  # divided by w0 > 1: the step on the old logit is smaller ...
    trained = torch.tensor([[2.0, 0.0]])  # ... so the model settles with a larger old logit than plain CE would
    assert F.cross_entropy(aligned_logits(trained, w), torch.tensor([0])) > F.cross_entropy(trained, torch.tensor([0]))


# -- the boosted model -------------------------------------------------------------------------------


def _net(hidden=4):
    torch.manual_seed(0)
    return build_network("mlp", (1, 8, 8), hidden=[hidden])


def _method(**hp):
    return FOSTER(FOSTER.parse_args(hp), _net(), FakeContext())


def _grow(m, index, start, stop):
    t = Task(index, start, stop)
    m.task = t
    m.grow(t)
    return t


def test_boosted_model_keeps_the_old_model_and_adds_a_copied_extractor():
    m = _method()
    _grow(m, 0, 0, 2)
    old_w = m.net.head.weight.detach().clone()
    t1 = _grow(m, 1, 2, 5)
    m.start_task(t1)  # the teacher: the single-backbone network after grow (old rows + new rows)
    b = BoostedNet(m.teacher.module, n_old=2)
    assert len(b.backbone.extractors) == 2 and b.backbone.out_dim == 8
    old, new = b.backbone.extractors
    assert not any(p.requires_grad for p in old.parameters()) and all(p.requires_grad for p in new.parameters())
    assert torch.equal(old.layers[0].weight, new.layers[0].weight)  # phi_t starts as phi_old (official)
    w = b.head.weight.detach()
    assert w.shape == (5, 8) and b.head.bias.shape == (5,)
    assert torch.equal(w[:2, :4], old_w) and torch.equal(w[:2, 4:], torch.zeros(2, 4))
    assert b.aux_head.in_features == 4 and b.aux_head.out_features == 5  # W_a on phi_t, every seen class
    x = torch.randn(3, 1, 8, 8)
    out = b(x)
    assert out["logits"].shape == (3, 5) and out["fe_logits"].shape == (3, 5) and out["features"].shape == (3, 8)
    # the old logits are the previous model's: the teacher's on its old classes; at the start S_b = S_old there
    assert torch.allclose(out["old_logits"], m.teacher.old_logits(x, 2), atol=1e-6)
    assert torch.allclose(out["logits"][:, :2], out["old_logits"], atol=1e-6)
    # official update_fc: the old rows' phi_t columns keep a fresh init
    b2 = BoostedNet(Teacher(m.net).module, n_old=2, zero_new_columns=False)
    assert torch.equal(b2.head.weight[:2, :4], old_w) and b2.head.weight[:2, 4:].abs().sum() > 0


def _fake_train_data(labels):
    labels = torch.as_tensor(labels)
    return type("D", (), {"labels": labels, "indices_of": lambda self, cs: torch.nonzero(
        torch.isin(labels, torch.as_tensor(list(cs)))).flatten()})()


class _Memory:
    """The exemplars: every sample of classes 0 and 1 of ``_fake_train_data``."""

    replay_ratio = None

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.indices(range(2)))

    def indices(self, classes=range(2)):
        return self.data.indices_of(classes)


def _ctx(labels, **kw):
    data = _fake_train_data(labels)
    return FakeContext(train_data=data, memory=_Memory(data), **kw)


def test_boosting_stage_trains_the_new_extractor_and_heads_with_aligned_ce_fe_and_kd():
    labels = [0] * 3 + [1] * 3 + [2] * 10 + [3] * 10
    ctx = _ctx(labels)
    m = FOSTER(FOSTER.parse_args({"beta1": [0.9, 0.5], "beta2": 0.97}), _net(), ctx)
    _grow(m, 0, 0, 2)
    t1 = _grow(m, 1, 2, 4)
    m.start_task(t1)
    m.before_task(t1)
    assert m.beta1_of(t1) == 0.9 and m.beta1_of(Task(5, 0, 2)) == 0.5  # one per task, the last repeating
    assert m.w1.tolist() == pytest.approx(effective_number_weights(torch.tensor([3, 3, 10, 10]), 0.9).tolist())
    assert m.w2.tolist() == pytest.approx(effective_number_weights(torch.tensor([3, 3, 10, 10]), 0.97).tolist())
    groups = m.param_groups(t1)
    trained = {id(p) for g in groups for p in g["params"]}
    b = m.boosted
    expected = {id(p) for mod in (b.new, b.head, b.aux_head) for p in mod.parameters()}
    assert trained == expected  # neither phi_old, nor the old classifier, nor the single-backbone network
    m.net.eval()
    m.train_mode()
    assert b.new.training and not b.backbone.extractors[0].training
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 3])
    out = b(x)
    by_hand = (F.cross_entropy(out["logits"] / m.w1, y) + F.cross_entropy(out["fe_logits"], y)
               + kd_loss(out["logits"][:, :2], out["old_logits"], 2.0))
    assert m.loss(x, y).item() == pytest.approx(by_hand.item(), rel=1e-5)
    m.hp.kd_weight, m.hp.fe_weight = 0.0, 0.0
    assert m.loss(x, y).item() == pytest.approx(F.cross_entropy(out["logits"] / m.w1, y).item(), rel=1e-5)


def test_new_rows_old_features_zero_keeps_the_new_classes_off_the_old_extractor():
    ctx = _ctx([0, 1, 2, 3])
    m = FOSTER(FOSTER.parse_args({"new_rows_old_features": "zero"}), _net(), ctx)
    _grow(m, 0, 0, 2)
    t1 = _grow(m, 1, 2, 4)
    m.start_task(t1)
    m.before_task(t1)
    w = m.boosted.head.weight
    assert torch.equal(w[2:, :4].detach(), torch.zeros(2, 4))
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step
    m.after_step()
    assert torch.equal(w[2:, :4].detach(), torch.zeros(2, 4)) and (w[2:, 4:] != 0).all() and (w[:2, :4] != 0).all()


def test_compression_trains_the_single_backbone_network_from_the_old_extractor_by_balanced_kd():
    labels = [0] * 3 + [1] * 3 + [2] * 10 + [3] * 10
    fits = []
    ctx = _ctx(labels, fit=lambda **call: fits.append(call) or {})
    m = FOSTER(FOSTER.parse_args({"compression_epochs": 3}), _net(), ctx)
    _grow(m, 0, 0, 2)
    old_bb = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    old_rows = m.net.head.weight.detach()[:2].clone()
    t1 = _grow(m, 1, 2, 4)
    m.start_task(t1)
    m.before_task(t1)
    # the student is the network as grow left it: phi_old's weights and the old classifier rows
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in old_bb.items())
    assert torch.equal(m.net.head.weight.detach()[:2], old_rows) and m.net.head.weight.shape == (4, 4)
    m.compress(t1)
    (fit,) = fits
    assert fit["stage"].epochs == 3 and fit["stage"].weight_decay == 0.0 and fit["stage"].schedule == "cosine"
    assert {id(p) for g in fit["groups"] for p in g["params"]} == {id(p) for p in m.net.parameters()}
    assert not any(p.requires_grad for p in m.boosted.parameters())
    fit["train_mode"]()
    assert m.net.training and not any(mod.training for mod in m.boosted.modules())
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 3])
    expected = balanced_kd(m.net(x)["logits"], m.boosted(x)["logits"], m.w2, 2.0)
    assert fit["loss"](x, y).item() == pytest.approx(expected.item(), rel=1e-6)  # no label term


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="beta1"):
        FOSTER.parse_args({"beta1": 1.0})
    with pytest.raises(ConfigError, match=r"beta1\[1\]"):
        FOSTER.parse_args({"beta1": [0.9, -0.1]})
    with pytest.raises(ConfigError, match="beta1.*empty list"):
        tiny_cfg("foster", {"beta1": []})
    with pytest.raises(ConfigError, match="evaluated"):
        FOSTER.parse_args({"evaluated": "teacher"})
    with pytest.raises(ConfigError, match="compression_lr"):
        FOSTER.validate(tiny_cfg("foster", {"compression_optimizer": "adam", "compression_lr": 0.1}))


# -- end to end: budgets per task, the evaluated model, resume ---------------------------------------


@pytest.fixture(scope="module")
def two_tasks():
    """A driver after two tasks of the tiny config (one epoch a stage) and its checkpoint state."""
    d = tiny_driver("foster", {"compression_epochs": 1}, train={"epochs": 1})
    records = [d.run_task(t) for t in d.scenario.tasks[:2]]
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    return d, records, buf.getvalue()


def test_a_run_reports_parameters_and_exemplars_per_task_and_evaluates_the_single_backbone(two_tasks):
    d, (first, second), _ = two_tasks
    m = d.method
    assert m.boosted is None and len(m.param_counts) == 2
    single = sum(p.numel() for p in m.net.parameters())
    assert first["parameters"] == first["parameters_single"] == first["parameters_boosted"]
    assert second["parameters"] == second["parameters_single"] == single  # one backbone after compression
    bb = sum(p.numel() for p in m.net.backbone.parameters())
    assert second["parameters_boosted"] == 2 * bb + 4 * (2 * m.net.feature_dim + 1)  # two extractors + W (with bias)
    assert second["parameters_trained"] == bb + 4 * (2 * m.net.feature_dim + 1) + 4 * (m.net.feature_dim + 1)
    assert second["extractors"] == 1 and first["exemplars"] == second["exemplars"] == 60 == second["memory_size"]
    assert second["cnn"]["top1"] > 50 and second["nme"]["top1"] > 50  # 4 classes: chance is 25


def test_resume_round_trip_after_two_tasks(two_tasks):
    d, _, state = two_tasks
    d2 = tiny_driver("foster", {"compression_epochs": 1}, train={"epochs": 1})
    d2.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))
    sd, sd2 = d.net.state_dict(), d2.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert d2.method.param_counts == d.method.param_counts
    t1 = d.scenario.tasks[1]
    assert d2.evaluate(t1)["cnn"]["top1"] == d.evaluate(t1)["cnn"]["top1"]
    rec = d2.run_task(d.scenario.tasks[2])
    assert rec["parameters"] == sum(p.numel() for p in d2.net.parameters()) and len(d2.method.param_counts) == 3


def test_boosted_evaluation_reports_the_two_backbone_model():
    d = tiny_driver("foster", {"compression_epochs": 1, "evaluated": "boosted"}, train={"epochs": 1})
    for t in d.scenario.tasks[:2]:
        rec = d.run_task(t)
    m = d.method
    assert m.boosted is not None and rec["extractors"] == 2 and rec["parameters"] == rec["parameters_boosted"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m.inference(x)["logits"], m.boosted(x)["logits"])
    assert m.inference(x)["features"].shape[1] == 2 * m.net.feature_dim
