"""UCIR: cosine head, imprinting, the three losses, frozen old rows, CBF and an end-to-end run."""

import math

import pytest
import torch
from tiny import SMALL_CONVNET, FakeContext, assert_complete_run, open_task, smoke_run, tiny_driver

from cilkit.data.scenario import Task
from cilkit.methods.ucir import UCIR, adaptive_lambda, less_forget_loss, margin_ranking_loss
from cilkit.models.heads import CosineLinear
from cilkit.models.network import build_network
from cilkit.training.stage import Stage, build_optimizer, build_scheduler


def _method(hidden=4, **hp):
    """A UCIR method on a small MLP with a fake context (the tests feed it hand-made features)."""
    net = build_network("mlp", (1, 8, 8), hidden=[hidden], **UCIR.backbone_options)
    return UCIR(UCIR.parse_args(hp), net, FakeContext())


def _two_tasks(m, old_rows, n_new, new_features):
    """Task 0 with ``old_rows`` as its class rows, then task 1 opened as the driver does (teacher, ``before_task``)."""
    t0 = Task(0, 0, old_rows.shape[0])
    m.task = t0
    m.grow(t0)
    with torch.no_grad():
        m.net.head.blocks[0].copy_(old_rows)
    t1 = Task(1, t0.stop, t0.stop + n_new)
    m.task = t1
    m.grow(t1)
    m.class_features = lambda c: new_features[c]
    m.start_task(t1)
    m.before_task(t1)
    return t1


def test_cosine_logits_ignore_the_scale_of_a_weight_row():
    head = CosineLinear(3, sigma=2.5)
    head.add_classes(4)
    f = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])
    before = head(f)
    with torch.no_grad():
        head.blocks[0][1] *= 7.0
        head.blocks[0][3] *= 0.01
    assert torch.allclose(head(f), before, atol=1e-6)
    assert torch.allclose(before, 2.5 * head.cosine(f))
    assert head.cosine(f).abs().max() <= 1 + 1e-6


def test_ucir_replaces_the_head_with_a_learnable_cosine_head():
    m = _method()
    assert isinstance(m.net.head, CosineLinear)
    assert isinstance(m.net.head.sigma, torch.nn.Parameter) and m.net.head.sigma.item() == 1.0


def test_last_block_has_no_relu_so_features_can_be_negative():
    assert UCIR.backbone_options == {"last_relu": False}
    torch.manual_seed(0)
    f = _method(hidden=32).net.backbone(torch.randn(16, 1, 8, 8))["features"]
    assert (f < 0).any() and (f > 0).any()


def test_imprinted_rows_have_the_mean_old_norm_and_the_mean_normalised_feature_direction():
    m = _method(hidden=2)
    old = torch.tensor([[3.0, 0.0], [0.0, -1.0]])  # norms 3 and 1: mean 2
    feats = {
        2: torch.tensor([[4.0, 0.0], [0.0, 0.5]]),  # normalised: (1,0), (0,1) -> mean (.5,.5) -> (1,1)/sqrt2
        3: torch.tensor([[-2.0, 0.0], [-10.0, 0.0], [0.0, 3.0]]),  # (-1,0),(-1,0),(0,1) -> (-2/3,1/3)
    }
    _two_tasks(m, old, 2, feats)
    new = m.net.head.blocks[1].detach()
    r2 = 1 / math.sqrt(2)
    assert torch.allclose(new[0], torch.tensor([2 * r2, 2 * r2]), atol=1e-6)
    assert torch.allclose(new[1], 2 * torch.tensor([-2.0, 1.0]) / math.sqrt(5), atol=1e-6)
    assert torch.allclose(new.norm(dim=1), torch.tensor([2.0, 2.0]))
    assert torch.equal(m.net.head.blocks[0].detach(), old)  # old rows untouched


def test_adaptive_lambda_is_five_times_sqrt_old_over_new():
    assert adaptive_lambda(5.0, 50, 10) == pytest.approx(5 * math.sqrt(5))
    m = _method(hidden=2)
    feats = {c: torch.randn(4, 2) for c in range(2, 5)}
    _two_tasks(m, torch.randn(2, 2), 3, feats)
    assert m.lam == pytest.approx(5 * math.sqrt(2 / 3))
    m2 = _method(hidden=2, adaptive_lambda=False, lambda_base=10.0)
    _two_tasks(m2, torch.randn(2, 2), 3, feats)
    assert m2.lam == 10.0


def test_less_forget_loss_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    f_old = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # cosines 1/sqrt2 and -1
    loss = less_forget_loss(f, f_old)
    assert loss.item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 2) / 2)
    loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_margin_ranking_loss_with_one_violating_negative():
    # 2 old classes (0, 1), 3 new classes (2, 3, 4); unscaled cosines.
    cos = torch.tensor(
        [
            [0.6, 0.1, 0.3, 0.05, -0.2],  # label 0: top-2 new 0.3, 0.05 -> 0.5-0.6+0.3 = 0.2, 0.5-0.6+0.05 < 0
            [0.0, 0.9, 0.2, 0.3, 0.1],  # label 1: top-2 new 0.3, 0.2 -> both hinges 0
            [0.9, 0.9, 0.0, -0.5, 0.1],  # label 3 (new): not a hard sample, though it would violate
        ]
    )
    y = torch.tensor([0, 1, 3])
    loss = margin_ranking_loss(cos, y, n_old=2, K=2, margin=0.5)
    assert loss.item() == pytest.approx(0.2 / 4)  # averaged over 2 old samples x K=2 pairs
    # the same as the official nn.MarginRankingLoss on the (gt, negative) pairs
    gt = torch.tensor([0.6, 0.6, 0.9, 0.9])
    neg = torch.tensor([0.3, 0.05, 0.3, 0.2])
    ref = torch.nn.MarginRankingLoss(margin=0.5)(gt, neg, torch.ones(4))
    assert loss.item() == pytest.approx(ref.item())
    assert margin_ranking_loss(cos[2:], y[2:], n_old=2, K=2, margin=0.5).item() == 0.0


def test_old_rows_stay_fixed_during_training_while_sigma_and_new_rows_learn():
    torch.manual_seed(0)
    m = _method(hidden=8)
    feats = {c: torch.randn(5, 8) for c in range(3, 5)}
    t1 = _two_tasks(m, torch.randn(3, 8), 2, feats)
    old = m.net.head.blocks[0].detach().clone()
    new = m.net.head.blocks[1].detach().clone()
    sigma = m.net.head.sigma.item()
    stage = Stage(epochs=1, lr=0.1, weight_decay=5e-4, momentum=0.9)
    opt = build_optimizer(m.param_groups(t1), stage)
    sched = build_scheduler(opt, stage, 3)
    x, y = torch.randn(16, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 3, 4, 0] * 2)
    m.net.train()
    for _ in range(3):  # several steps, so momentum and weight decay would show
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert m.net.head.blocks[0].grad is not None  # the old rows do get a gradient ...
    assert torch.equal(m.net.head.blocks[0].detach(), old)  # ... but never move
    assert not torch.equal(m.net.head.blocks[1].detach(), new)
    assert m.net.head.sigma.item() != sigma


def test_loss_adds_lambda_dis_and_margin_ranking_to_ce():
    torch.manual_seed(1)
    m = _method(hidden=8)
    t1 = _two_tasks(m, torch.randn(3, 8), 2, {c: torch.randn(5, 8) for c in range(3, 5)})
    with torch.no_grad():
        m.net.backbone.layers[0].weight.add_(0.3 * torch.randn_like(m.net.backbone.layers[0].weight))
    m.net.eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 4])
    with torch.no_grad():
        f, f_old = m.net.backbone(x)["features"], m.teacher(x)["features"]
        cos = m.net.head.cosine(f)
        ce = torch.nn.functional.cross_entropy(m.net.head.sigma * cos, y)
        expected = ce + m.lam * less_forget_loss(f, f_old) + margin_ranking_loss(cos, y, t1.start, 2, 0.5)
        assert less_forget_loss(f, f_old) > 0
        assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_balanced_finetuning_moves_only_the_class_rows():
    d = tiny_driver("ucir", {"cbf_epochs": 2}, model=SMALL_CONVNET)  # BatchNorm statistics must not move
    m = d.method
    t0, t1 = d.scenario.tasks[:2]
    d.run_task(t0)
    open_task(d, 1)
    backbone = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    sigma, rows = m.net.head.sigma.item(), m.net.head.weight.detach().clone()
    fits, fit = [], m.ctx.fit
    m.ctx.fit = lambda *args, **hooks: fits.append(hooks) or fit(*args, **hooks)
    m.after_task(t1)  # memory update, then CBF
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in backbone.items())
    assert m.net.head.sigma.item() == sigma
    after = m.net.head.weight.detach()
    assert not torch.equal(after[: t1.start], rows[: t1.start]) and not torch.equal(after[t1.start :], rows[t1.start :])
    sizes = {len(v) for v in m.memory.exemplars.values()}
    assert sizes == {60 // t1.stop} and len(m.memory.exemplars) == t1.stop  # balanced, new classes included
    (cbf,) = fits  # CBF's train mode: the head trains, the backbone (BatchNorm) stays in eval mode
    m.net.train()
    cbf["train_mode"]()
    assert m.net.head.training and not any(mod.training for mod in m.net.backbone.modules())


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "ucir", {"cbf_epochs": 2})
    assert_complete_run(metrics, nme=True)
    assert isinstance(exp.method.net.head, CosineLinear) and exp.method.net.head.n_classes == 10
