"""LwM: Grad-CAM and the attention distillation loss by hand, gradients, the teacher, config checks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, smoke_run
from torch import nn

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses import kd_loss
from cilkit.methods.lwm import LwM, attention_distillation, grad_cam, selected
from cilkit.models.network import IncrementalNet, build_network
from cilkit.presets import load_yaml

TASK0, TASK1 = Task(0, 0, 2), Task(1, 2, 4)  # two old classes, then two new ones


class OneConv(nn.Module):
    """A 1-conv-layer backbone: A = conv(x) (no ReLU, so A has both signs); features = GAP(A)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(1, channels, 3, padding=1)])
        self.out_dim = channels

    def forward(self, x):
        a = self.stages[0](x)
        return {"features": a.mean(dim=(2, 3)), "maps": [a]}


def _open(m, task):
    """Start ``task`` as the driver does: grow, the teacher (from the second task on), ``before_task``."""
    m.task = task
    m.grow(task)
    m.start_task(task)
    m.before_task(task)


def _method(args=None, second_task=True, backbone=None):
    """LwM after task 0 and (by default) ``before_task`` of task 1, the student then perturbed."""
    torch.manual_seed(0)
    net = IncrementalNet(backbone) if backbone is not None else build_network("convnet", (1, 8, 8), widths=[4, 6])
    m = LwM(LwM.parse_args(args or {}), net, FakeContext())
    _open(m, TASK0)
    if second_task:
        _open(m, TASK1)
    snapshot = copy.deepcopy(net).eval()  # as the teacher: eval mode (BatchNorm running statistics)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 1, 8, 8)
    y = torch.tensor([2, 3, 3, 2, 3]) if second_task else torch.tensor([0, 1, 1, 0, 1])
    return m, snapshot, x, y


def _hand_cam(net, x, b):
    """Q = ReLU(sum_k w_{b,k}/(HW) A_k) for the 1-conv net with a linear head on GAP."""
    a = net.backbone.stages[0](x).detach()
    w = net.head.weight.detach()[b]  # (B, C)
    return F.relu((w[:, :, None, None] / (a.shape[2] * a.shape[3]) * a).sum(1))


# -- Grad-CAM and L_AD by hand ---------------------------------------------------------------------


def test_grad_cam_matches_the_hand_computation_on_a_one_conv_net():
    torch.manual_seed(1)
    net = IncrementalNet(OneConv())
    net.add_classes(4)
    x = torch.randn(3, 1, 5, 5)
    b = torch.tensor([0, 3, 1])
    out = net(x)
    q = grad_cam(selected(out["logits"], b), out["maps"][-1])
    expected = _hand_cam(net, x, b)
    assert q.shape == (3, 5, 5)
    assert (expected > 0).any() and (expected == 0).any()  # the ReLU matters here
    assert torch.allclose(q, expected, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())  # autograd.grad, not .backward


def test_teacher_grad_cam_uses_the_teachers_top_old_class_and_leaves_it_untouched():
    m, snapshot, x, _ = _method(backbone=OneConv())
    old, fmap = m.teacher_forward(x)
    assert torch.allclose(old, snapshot(x)["logits"][:, :2].detach(), atol=1e-6)
    b, b_student = m.attention_classes(old, m.net(x)["logits"])
    assert torch.equal(b, snapshot(x)["logits"][:, :2].argmax(1)) and torch.equal(b, b_student)
    q = grad_cam(selected(old, b), fmap)
    assert torch.allclose(q, _hand_cam(snapshot, x, b), atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.module.parameters())
    # the hook is removed afterwards: a plain forward of the frozen copy, with grad enabled, records nothing
    assert not m.teacher.module(x)["maps"][-1].requires_grad


def test_attention_class_options():
    m, _, _, _ = _method({"attention_class": "own"})
    teacher_old = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    student = torch.tensor([[3.0, 0.0, 0.0, 9.0], [0.0, 5.0, 1.0, 0.0]])
    assert [t.tolist() for t in m.attention_classes(teacher_old, student)] == [[1, 0], [3, 1]]
    m.hp.attention_class = "student"  # Douillard: the student's argmax over the old classes, for both
    assert [t.tolist() for t in m.attention_classes(teacher_old, student)] == [[0, 1], [0, 1]]
    m.hp.attention_class = "teacher"  # the paper: the teacher's top base class, for both
    assert [t.tolist() for t in m.attention_classes(teacher_old, student)] == [[1, 0], [1, 0]]


def test_attention_distillation_by_hand():
    q_teacher = torch.tensor([[[3.0, 4.0]], [[1.0, 1.0]], [[0.0, 2.0]]])  # (B=3, H=1, W=2)
    q_student = torch.tensor([[[1.0, 0.0]], [[2.0, 2.0]], [[5.0, 0.0]]])
    # (0.6, 0.8) vs (1, 0): 0.4 + 0.8 = 1.2; the same direction: 0; (0, 1) vs (1, 0): 2
    assert attention_distillation(q_teacher, q_student).item() == pytest.approx((1.2 + 0.0 + 2.0) / 3, rel=1e-6)


# -- gradients ----------------------------------------------------------------------------------------


def _attention_only(m, x):
    out = m.net(x)
    old, fmap = m.teacher_forward(x)
    return m.attention_loss(out, old, fmap)


def test_attention_loss_trains_the_student_through_maps_and_alpha():
    m, _, x, _ = _method()
    _attention_only(m, x).backward()
    backbone_grads = [p.grad for p in m.net.backbone.parameters()]
    assert all(g is not None for g in backbone_grads) and sum(g.abs().sum() for g in backbone_grads) > 0
    # create_graph=True: alpha_k = w_{b,k}/HW carries gradient into the old rows of the classifier
    assert m.net.head.blocks[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.module.parameters())


def test_attention_loss_without_create_graph_treats_alpha_as_a_constant():
    m, _, x, _ = _method({"gradcam_create_graph": False})
    _attention_only(m, x).backward()
    assert sum(p.grad.abs().sum() for p in m.net.backbone.parameters()) > 0  # A_S still carries gradient
    w = m.net.head.blocks[0].weight.grad
    assert w is None or w.abs().sum() == 0  # the head enters Q_S only through alpha


def test_attention_loss_is_zero_with_zero_gradient_when_student_equals_teacher():
    m, _, x, _ = _method(second_task=False)
    _open(m, TASK1)  # the teacher is an exact copy of the student
    m.net.eval()
    loss = _attention_only(m, x)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in m.net.parameters())


def test_loss_is_ce_plus_beta_kd_plus_gamma_ad_and_leaves_no_grad_behind():
    m, snapshot, x, y = _method({"beta": 0.7, "gamma": 1.3})
    loss = m.loss(x, y)
    assert all(p.grad is None for p in m.net.parameters())  # the Grad-CAM passes wrote no .grad
    out = m.net(x)
    s = out["logits"].detach()
    t = snapshot(x)["logits"].detach()[:, :2]
    ce = F.cross_entropy(s[:, 2:], y - 2)
    old, fmap = m.teacher_forward(x)
    expected = ce + 0.7 * kd_loss(s[:, :2], t, 2.0) + 1.3 * m.attention_loss(out, old, fmap).detach()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.module.parameters())


def test_bce_distillation_and_ce_over_all():
    m, snapshot, x, y = _method({"distill": "bce", "ce_mask": "all", "gamma": 0.0})
    s = m.net(x)["logits"].detach()
    t = torch.sigmoid(snapshot(x)["logits"].detach()[:, :2])
    p = torch.sigmoid(s[:, :2])
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert m.loss(x, y).item() == pytest.approx((F.cross_entropy(s, y) + bce).item(), rel=1e-5)


def test_first_task_is_plain_cross_entropy():
    m, _, x, y = _method({"beta": 5.0, "gamma": 5.0}, second_task=False)
    assert m.teacher is None
    assert m.loss(x, y).item() == pytest.approx(F.cross_entropy(m.net(x)["logits"], y).item())


# -- configuration and end to end ------------------------------------------------------------------


@pytest.mark.parametrize("budget", [{"size": 100}, {"per_class": 20}])
def test_memory_budget_is_refused(budget):
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "lwm", "memory": budget}])
    assert e.value.field == f"memory.{next(iter(budget))}" and "keeps no exemplars" in e.value.message


def test_protocol_presets_drop_the_protocol_memory():
    for protocol in ("digits", "fmnist", "tin32-cpu"):
        layer = load_yaml(f"protocols/{protocol}/lwm")
        assert layer["method"] == "lwm" and layer["memory"]["size"] is None
    cfg = cilkit.resolve([load_yaml("protocols/digits/lwm")])
    assert cfg.method == "lwm" and cfg.memory.size is None


def test_mlp_backbone_is_refused_before_training():
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "lwm", "model": {"backbone": "mlp"}, "data": {"dataset": "digits"}}])
    assert e.value.field == "model.backbone" and "has no convolutional feature maps" in e.value.message


def test_compiled_backbone_is_refused_before_training():
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "lwm", "train": {"compile": True}}])
    assert e.value.field == "train.compile"


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "lwm")
    assert_complete_run(metrics, nme=False)
    assert exp.driver.memory is None and all(t["memory_size"] == 0 for t in metrics["tasks"])
    assert exp.method.teacher is None  # dropped after the last task
