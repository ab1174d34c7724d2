"""SPB / SPB-I / SPB-M: weights, L_em, prototypes, the rotation head, the perspective classifiers."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, smoke_run
from torch import nn

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.losses import embedding_distillation
from cilkit.losses.contrastive import info_nce
from cilkit.methods.spb import SPB, SPBI, SPBM, reciprocal_weights, rotations, second_view
from cilkit.models.backbones import BasicBlock
from cilkit.models.heads import CosineLinear, RotationHead
from cilkit.models.network import build_network

T0, T1 = Task(0, 0, 2), Task(1, 2, 4)


def _method(cls, backbone="mlp", shape=(1, 8, 8), hidden=2, **hp):
    """A method on a tiny network with a fake context (the tests feed it hand-made features)."""
    net = build_network(backbone, shape, hidden=[hidden], widths=[4, 8, 8])
    return cls(cls.parse_args(hp), net, FakeContext())


def _start(m, task):
    m.task = task
    m.grow(task)


def _open(m, task):
    """Start ``task`` as the driver does: grow, the teacher (from the second task on), ``before_task``."""
    _start(m, task)
    m.start_task(task)
    m.before_task(task)


# -- SPB ----------------------------------------------------------------------------------------------


def test_cosine_classifier_with_a_learnable_scale_starting_at_16():
    head = _method(SPB).net.head
    assert isinstance(head, CosineLinear) and isinstance(head.sigma, nn.Parameter) and head.sigma.item() == 16.0
    fixed = _method(SPB, scale_init=10.0, learn_scale=False).net.head
    assert not isinstance(fixed.sigma, nn.Parameter) and fixed.sigma.item() == 10.0


def test_reciprocal_weights_follow_the_class_ratios_and_the_clip():
    assert reciprocal_weights(0, 10) == (1.0, 0.0)  # first task: L = L_ce
    assert reciprocal_weights(50, 10) == pytest.approx((0.2, 5.0))
    assert reciprocal_weights(10, 10) == (1.0, 1.0)
    assert reciprocal_weights(50, 2) == pytest.approx((0.04, 25.0))
    assert reciprocal_weights(50, 2, clip=4.0) == pytest.approx((0.25, 4.0))
    assert reciprocal_weights(2, 50, clip=4.0) == pytest.approx((4.0, 0.25))
    assert reciprocal_weights(50, 25, clip=4.0) == pytest.approx((0.5, 2.0))  # inside the band: unchanged
    with pytest.raises(ConfigError) as e:
        _method(SPB, clip_weights=0.5)
    assert e.value.field == "method_args.clip_weights"


def test_clip_weights_below_one_is_refused_at_resolve_before_any_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr("cilkit.experiment.load_dataset", no_data)
    for method in ("spb", "spb-i", "spb-m"):
        with pytest.raises(ConfigError) as e:
            cilkit.resolve([{"method": method, "method_args": {"clip_weights": 0.5}}])
        assert e.value.field == "method_args.clip_weights"
    assert cilkit.resolve([{"method": "spb", "method_args": {"clip_weights": 1.0}}]).method_args == {"clip_weights": 1.0}


def test_embedding_distillation_by_hand():
    f_new = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    f_old = torch.tensor([[8.0, 6.0], [0.0, 2.0]], requires_grad=True)
    # (0.6, 0.8) vs (0.8, 0.6): 0.04 + 0.04 = 0.08; (1, 0) vs (0, 1): 2.  Mean: 1.04.
    loss = embedding_distillation(f_new, f_old)
    assert loss.item() == pytest.approx(1.04)
    loss.backward()
    assert f_old.grad is None and f_new.grad.abs().sum() > 0
    assert embedding_distillation(5 * f_new, f_old).item() == pytest.approx(1.04)  # on normalised embeddings


def test_prototypes_initialise_the_new_rows_and_the_weights_are_set(caplog):
    m = _method(SPB)
    _start(m, T0)
    old = m.net.head.blocks[0].detach().clone()
    _start(m, T1)
    feats = {
        2: torch.tensor([[4.0, 0.0], [0.0, 0.5]]),  # normalised: (1,0), (0,1) -> (1,1)/sqrt2
        3: torch.tensor([[-2.0, 0.0], [-10.0, 0.0], [0.0, 3.0]]),  # (-1,0),(-1,0),(0,1) -> (-2,1)/sqrt5
    }
    m.class_features = lambda c: feats[c]
    with caplog.at_level(logging.INFO, logger="cilkit"):
        m.start_task(T1)
        m.before_task(T1)
    new = m.net.head.blocks[1].detach()
    assert torch.allclose(new[0], torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(new[1], torch.tensor([-2.0, 1.0]) / math.sqrt(5), atol=1e-6)
    assert torch.equal(m.net.head.blocks[0].detach(), old)
    assert (m.w_ce, m.w_em) == (1.0, 1.0) and m.teacher is not None
    assert sum("w_ce" in r.getMessage() for r in caplog.records) == 1


def test_loss_is_ce_on_the_first_task_then_the_weighted_sum():
    torch.manual_seed(0)
    m = _method(SPB, hidden=8)
    x, y0 = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    _open(m, T0)
    assert m.loss(x, y0).item() == pytest.approx(F.cross_entropy(m.net(x)["logits"], y0).item())
    t1 = Task(1, 2, 5)  # 2 old, 3 new: w_ce = 3/2, w_em = 2/3
    _start(m, t1)
    m.class_features = lambda c: torch.randn(4, 8)
    m.start_task(t1)
    m.before_task(t1)
    with torch.no_grad():
        for p in m.net.backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))  # move the student away from the teacher
    y = torch.tensor([2, 3, 4, 2, 3, 4])
    f, f_old = m.net.backbone(x)["features"], m.teacher(x)["features"]
    l_em = ((F.normalize(f, dim=1) - F.normalize(f_old, dim=1)) ** 2).sum(1).mean()
    assert l_em > 1e-4
    logits = m.net.head(f)
    expected = 1.5 * F.cross_entropy(logits[:, 2:], y - 2) + (2 / 3) * l_em  # ce_mask: new (default)
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    m.hp.ce_mask = "all"
    expected = 1.5 * F.cross_entropy(logits, y) + (2 / 3) * l_em
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["spb", "spb-i", "spb-m"])
def test_exemplar_free_methods_refuse_a_memory_budget(method):
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": method, "memory": {"size": 100}}])
    assert e.value.field == "memory.size"
    assert cilkit.resolve([{"method": method}]).method == method  # the dataset profile's budget is not the user's


# -- SPB-I --------------------------------------------------------------------------------------------


def test_rotations_are_stacked_in_order_with_labels_0_to_3():
    x = torch.randn(3, 2, 4, 4)
    stacked, labels = rotations(x)
    assert stacked.shape == (12, 2, 4, 4)
    for k in range(4):
        assert torch.equal(stacked[3 * k : 3 * k + 3], torch.rot90(x, k, dims=(2, 3)))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    one = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # rotation 1 is a quarter turn counter-clockwise
    assert rotations(one)[0][1].flatten().tolist() == [2.0, 4.0, 1.0, 3.0]


def test_rotation_head_sees_the_prepooling_map_with_rotation_labels():
    torch.manual_seed(0)
    m = _method(SPBI, backbone="convnet")
    head = m.net.ssl_head
    assert isinstance(head, RotationHead) and sum(isinstance(b, BasicBlock) for b in head.blocks) == 2
    assert head.classifier.n_classes == 4
    assert any(p is head.classifier.sigma for p in m.param_groups(T0)[0]["params"])  # trained with the net
    _open(m, T0)
    m.net.eval()  # BatchNorm in eval mode: the same map whatever the batch
    seen = {}
    hook = head.register_forward_hook(lambda mod, inp, out: seen.update(maps=inp[0], out=out))
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 1, 0, 1])
    loss = m.loss(x, y)
    hook.remove()
    out = m.net.backbone(rotations(x)[0])
    assert seen["maps"].shape == (20, 8, 2, 2) and torch.allclose(seen["maps"], out["maps"][-1], atol=1e-6)
    r = torch.tensor([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5)
    l_ce = F.cross_entropy(m.net.head(out["features"][:5]), y)
    assert loss.item() == pytest.approx((l_ce + 1.0 * F.cross_entropy(seen["out"], r)).item(), rel=1e-5)


def test_rotation_ssl_needs_a_conv_backbone_but_instance_discrimination_does_not():
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "spb-i", "model": {"backbone": "mlp"}}])
    assert e.value.field == "model.backbone" and "has no convolutional feature maps" in e.value.message
    cilkit.resolve([{"method": "spb-i", "model": {"backbone": "mlp"}, "method_args": {"ssl": "instance"}}])
    m = _method(SPBI, ssl="instance", hidden=8)
    _open(m, T0)
    assert torch.isfinite(m.loss(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1])))


def test_info_nce_by_hand_and_the_second_view():
    tau = 0.5
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # each of the 4 projections: positive cosine 1, two negatives with cosine 0
    assert info_nce(z, z, tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6)
    x = torch.randn(8, 3, 8, 8)
    v = second_view(x)
    assert v.shape == x.shape and not torch.allclose(v, x)


# -- SPB-M --------------------------------------------------------------------------------------------


def test_one_classifier_per_rotation_with_distinct_parameters_restorable_on_resume():
    m = _method(SPBM)
    for t in (T0, T1):
        _start(m, t)
    heads = m.classifiers()
    assert len(heads) == 4 and all(h.n_classes == 4 for h in heads)
    params = [p for h in heads for p in h.parameters()]
    assert len({id(p) for p in params}) == len(params) == 4 * 3  # two blocks and sigma each
    assert not torch.equal(heads[1].weight, heads[3].weight)  # the 90 and 270 degree classifiers differ
    trained = {id(p) for g in m.param_groups(T1) for p in g["params"]}
    assert all(id(p) in trained for p in params)
    state = m.net.state_dict()
    assert "rot_heads.2.blocks.1" in state
    fresh = _method(SPBM)
    for t in (T0, T1):
        _start(fresh, t)  # what the driver replays on resume
    fresh.net.load_state_dict(state)
    assert torch.equal(fresh.net.rot_heads[0].weight, m.net.rot_heads[0].weight)


def test_every_perspective_classifier_gets_prototypes_of_its_rotation():
    m = _method(SPBM)
    for t in (T0, T1):
        _start(m, t)
    rows = {(c, k): F.normalize(torch.randn(2), dim=0) for c in (2, 3) for k in range(4)}
    m.perspective_features = lambda c, k: torch.stack([3.0 * rows[c, k], 0.5 * rows[c, k]])
    m.start_task(T1)
    m.before_task(T1)
    for k, head in enumerate(m.classifiers()):
        assert torch.allclose(head.blocks[1].detach(), torch.stack([rows[2, k], rows[3, k]]), atol=1e-6)


class _Flatten(nn.Module):
    """A stub backbone whose features are the pixels of a 1 x 2 x 2 image."""

    def forward(self, x):
        return {"features": x.flatten(1), "maps": []}


def test_ensemble_inference_averages_the_softmax_of_each_rotation_classifier():
    m = _method(SPBM, shape=(1, 2, 2), hidden=4)
    _start(m, Task(0, 0, 3))
    m.net.backbone = _Flatten()
    w = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    with torch.no_grad():
        for k, head in enumerate(m.classifiers()):
            head.blocks[0].copy_(w.roll(k, dims=1))  # a different classifier per rotation
            head.sigma.fill_(2.0 + k)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    views = [[1.0, 2, 3, 4], [2.0, 4, 1, 3], [4.0, 3, 2, 1], [3.0, 1, 4, 2]]  # rot90 by 0, 1, 2, 3 quarter turns
    expected, logits = 0, []
    for k, v in enumerate(views):
        z = (2.0 + k) * F.normalize(torch.tensor(v), dim=0) @ F.normalize(w.roll(k, dims=1), dim=1).t()
        logits.append(z)
        expected = expected + F.softmax(z, dim=0) / 4
    out = m.inference(x)
    assert torch.allclose(out["logits"].exp()[0], expected, atol=1e-6)
    assert not torch.allclose(expected, F.softmax(sum(logits) / 4, dim=0), atol=1e-3)  # not a mean of logits
    assert torch.equal(out["features"], x.flatten(1))  # the 0-degree features for the driver (NME)
    m.hp.inference = "upright"
    assert torch.allclose(m.inference(x)["logits"][0], logits[0], atol=1e-6)


def test_multi_perspective_loss_is_the_mean_ce_of_the_four_classifiers():
    torch.manual_seed(0)
    m = _method(SPBM, backbone="convnet")
    _open(m, T0)
    m.net.eval()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    ces = [
        F.cross_entropy(h(m.net.backbone(torch.rot90(x, k, dims=(2, 3)))["features"]), y) for k, h in enumerate(m.classifiers())
    ]
    assert m.loss(x, y).item() == pytest.approx((sum(ces) / 4).item(), rel=1e-5)


# -- smoke runs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spb", "spb-i", "spb-m"])
def test_smoke_run(method, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cilkit"):
        metrics, exp = smoke_run(tmp_path, method)
    assert_complete_run(metrics, nme=False)
    assert exp.driver.memory is None and all(t["memory_size"] == 0 for t in metrics["tasks"])
    assert sum("w_ce" in r.getMessage() for r in caplog.records) == 2  # logged once per task
    assert (exp.method.w_ce, exp.method.w_em) == (1.0, 1.0)  # 5 old, 5 new classes at the second task
