"""The parts every method shares, on hand-made tensors: masked CE, row norms, the teacher, modes,
the typed schema and its ranges, the configured stage."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cilkit.config import TrainConfig
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses import masked_ce
from cilkit.methods.base import Teacher
from cilkit.models.heads import CosineLinear, LocalSimilarityClassifier, mean_row_norm, weight_align_gamma
from cilkit.models.network import eval_mode
from cilkit.schema import from_dict, param


def test_masked_ce_over_new_classes_ignores_the_old_logits():
    logits = torch.tensor([[5.0, -1.0, 2.0, 0.0], [0.0, 9.0, 0.0, 1.0]], requires_grad=True)
    y = torch.tensor([2, 3])
    new = masked_ce(logits, y, n_old=2, over="new")
    expected = -(torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0] + torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]) / 2
    assert new.item() == pytest.approx(expected.item())
    new.backward()
    assert torch.all(logits.grad[:, :2] == 0)  # no gradient reaches the old rows
    assert masked_ce(logits, y, 2, "all").item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_mean_row_norm_and_weight_aligning_factor():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
    assert mean_row_norm(w).item() == pytest.approx((5 + 1 + 2) / 3)
    assert weight_align_gamma(w, 1) == pytest.approx(5 / 1.5)


def test_task_old_fraction():
    assert Task(2, 40, 60).old_fraction == pytest.approx(40 / 60)
    assert Task(0, 0, 10).old_fraction == 0.0


def test_teacher_is_a_frozen_copy_that_does_not_follow_the_student():
    net = nn.Sequential(nn.Linear(3, 2))
    net.backbone = nn.Identity()
    teacher = Teacher(net)
    x = torch.randn(4, 3)
    before = teacher(x).detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert torch.equal(teacher(x), before)
    assert not teacher(x).requires_grad and not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())


def test_eval_mode_restores_every_submodule_mode():
    net = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    with eval_mode(net):
        assert not net.training and not net[0].training
    assert net.training and net[0].training and not net[1].training


def test_lsc_is_a_cosine_classifier_with_proxies():
    torch.manual_seed(0)
    lsc = LocalSimilarityClassifier(4, proxies=3, eta=2.0)
    lsc.add_classes(2)
    assert isinstance(lsc, CosineLinear) and lsc.n_classes == 2 and lsc.weight.shape == (6, 4)
    assert lsc.eta is lsc.sigma and lsc.eta.item() == 2.0
    f = torch.randn(5, 4)
    s = lsc.cosine(f).view(5, 2, 3)
    assert torch.allclose(lsc(f), (s.softmax(2) * s).sum(2))


@dataclasses.dataclass
class _Hyper:
    T: float = param(2.0, gt=0)
    k: int = param(2, ge=1)
    ms: list[int] = param(default_factory=lambda: [10], ge=1)
    flag: bool | None = None


def test_schema_checks_types_ranges_and_takes_auto_for_none():
    assert from_dict(_Hyper, {"T": 1, "flag": "auto"}) == _Hyper(T=1.0, flag=None)
    assert from_dict(_Hyper, {"flag": True}).flag is True
    for data, field in [({"T": 0}, "m.T"), ({"k": 0}, "m.k"), ({"ms": [3, 0]}, "m.ms[1]"), ({"flag": "maybe"}, "m.flag"),
                        ({"T": "x"}, "m.T"), ({"nope": 1}, "m.nope")]:
        with pytest.raises(ConfigError) as e:
            from_dict(_Hyper, data, "m.")
        assert e.value.field == field, data


def test_configured_stage_uses_the_first_task_settings_on_task_0_only():
    train = TrainConfig(epochs=3, first_epochs=7, lr=0.1, first_lr=0.5, milestones=[2], first_milestones=[4, 6])
    first, later = train.stage(0), train.stage(1)
    assert (first.epochs, first.lr, first.milestones) == (7, 0.5, [4, 6])
    assert (later.epochs, later.lr, later.milestones) == (3, 0.1, [2])
    assert later.replace(epochs=1).epochs == 1 and later.epochs == 3


def test_the_loop_calls_before_step_with_the_gradients_in_place():
    from cilkit.training.loop import fit
    from cilkit.training.stage import Stage
    from tiny import open_task, tiny_driver

    d = tiny_driver("finetune")
    open_task(d, 0)
    net, seen = d.net, []
    before = [p.detach().clone() for p in net.parameters()]

    def zero_the_gradients():
        seen.append(all(p.grad is not None for p in net.parameters()))
        for p in net.parameters():
            p.grad.zero_()

    stage = Stage(epochs=1, lr=0.5, weight_decay=0.0, momentum=0.0, batch_size=32)
    fit(d.runtime, [{"params": list(net.parameters())}], d.runtime.train_data.indices_of(range(2)), stage,
        d.method.loss, before_step=zero_the_gradients)
    assert seen and all(seen)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # zeroed gradients: no step moved them
