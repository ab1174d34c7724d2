"""PASS: prototype augmentation (the radius from the class variances), the rotation labels and head, the loss
and its weights, the feature distillation, the inference over the unrotated rows, the state, the config."""


import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, reload_through_weights_only, tiny_cfg

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.base import Teacher
from cilkit.methods.pass_ import (PASS, LabelAugmentedLinear, class_statistics, feature_distillation, proto_augment,
                                  radius, rotation_labels)
from cilkit.models.network import build_network
from cilkit.presets import load_yaml

T0, T1, T2 = Task(0, 0, 2), Task(1, 2, 4), Task(2, 4, 6)


def _method(**hp):
    torch.manual_seed(0)
    net = build_network("mlp", (1, 4, 4), hidden=[3])
    return PASS(PASS.parse_args(hp), net, FakeContext())


def _learn(m, task, feats):
    """The structure and the after-task statistics of ``task`` with hand-made features (no training)."""
    m.task = task
    m.grow(task)
    m.extract = lambda c: feats[c]
    m.after_task(task)


# hand-made 2-d features of six classes, each with its own spread
FEATS = {
    0: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]]),  # var (4/3, 16/3): tr/D = 10/3
    1: torch.tensor([[10.0, 0.0], [12.0, 0.0], [10.0, 2.0], [12.0, 2.0]]),  # var (4/3, 4/3): tr/D = 4/3
    2: torch.tensor([[0.0, 10.0], [6.0, 10.0], [0.0, 16.0], [6.0, 16.0]]),  # var (12, 12): tr/D = 12
    3: torch.tensor([[10.0, 10.0], [10.0, 10.0], [10.0, 10.0]]),  # no spread: tr/D = 0
    4: torch.tensor([[5.0, 5.0], [7.0, 5.0]]),  # var (2, 0): tr/D = 1
    5: torch.tensor([[1.0, 1.0], [1.0, 3.0]]),  # var (0, 2): tr/D = 1
}


# -- prototype augmentation -------------------------------------------------------------------------------


def test_class_statistics_are_the_plain_mean_and_the_mean_unbiased_variance():
    mean, var = class_statistics(FEATS[0])
    assert mean.tolist() == [1.0, 2.0]  # not normalised (unlike NME's class_mean)
    assert var.item() == pytest.approx(10 / 3)  # tr(np.cov(x.T)) / D, the unbiased covariance
    assert var.item() == pytest.approx(torch.cov(FEATS[0].T).trace().item() / 2)
    assert class_statistics(FEATS[3])[1].item() == 0.0
    assert class_statistics(torch.tensor([[3.0, 4.0]]))[1].item() == 0.0  # one sample: no spread, no NaN
    assert radius(torch.tensor([10 / 3, 4 / 3])).item() == pytest.approx((7 / 3) ** 0.5)


def test_pseudo_features_have_the_prototype_as_mean_and_the_radius_as_spread():
    protos = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -5.0, 3.0, 1.0], [-4.0, 8.0, 0.0, 2.0]])
    r = 0.7
    g = torch.Generator().manual_seed(0)
    x, c = proto_augment(protos, r, 30000, generator=g)
    assert x.shape == (30000, 4) and c.shape == (30000,) and c.dtype == torch.long
    counts = torch.bincount(c, minlength=3).float() / 30000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.015)  # classes drawn uniformly
    for k in range(3):
        xk = x[c == k]
        assert torch.allclose(xk.mean(0), protos[k], atol=0.03)  # centred on the class's prototype
        assert torch.allclose(xk.std(0), torch.full((4,), r), rtol=0.03)  # isotropic, scale r in every dimension
    again = proto_augment(protos, r, 30000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], c)
    zero, _ = proto_augment(protos, 0.0, 5, generator=g)
    assert all(any(torch.equal(row, p) for p in protos) for row in zero)  # r = 0: the prototypes themselves


def test_radius_from_the_first_task_only_or_from_every_class_so_far():
    first, every = _method(), _method(radius="every")
    for m in (first, every):
        _learn(m, T0, FEATS)
        assert m.radius.item() == pytest.approx(((10 / 3 + 4 / 3) / 2) ** 0.5)
        assert torch.allclose(m.prototypes, torch.tensor([[1.0, 2.0], [11.0, 1.0]]))
        _learn(m, T1, FEATS)
        assert torch.allclose(m.prototypes[2:], torch.tensor([[3.0, 13.0], [10.0, 10.0]]))
        assert torch.allclose(m.variances, torch.tensor([10 / 3, 4 / 3, 12.0, 0.0]))
    assert first.radius.item() == pytest.approx((7 / 3) ** 0.5)  # the official code: task 1's classes, fixed
    assert every.radius.item() == pytest.approx(((10 / 3 + 4 / 3 + 12) / 4) ** 0.5)  # PyCIL: every class seen
    _learn(first, T2, FEATS)
    assert first.prototypes.shape == (6, 2) and first.radius.item() == pytest.approx((7 / 3) ** 0.5)


# -- rotation labels, the head, the inference ---------------------------------------------------------------


def test_rotation_labels_are_four_per_class_class_major():
    y = torch.tensor([1, 3])
    r = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # rotation-major, as spb.rotations stacks the batch
    assert rotation_labels(y, r).tolist() == [4, 12, 5, 13, 6, 14, 7, 15]  # the official target * 4 + k
    m = _method()
    x = torch.randn(2, 1, 4, 4)
    xs, ys = m.augment_labels(x, y)
    for k in range(4):
        assert torch.equal(xs[2 * k : 2 * k + 2], torch.rot90(x, k, dims=(2, 3)))
        assert (ys[2 * k : 2 * k + 2] % 4 == k).all() and (ys[2 * k : 2 * k + 2] // 4).tolist() == [1, 3]
    plain = _method(ssl=False)
    assert plain.augment_labels(x, y)[0] is x and plain.augment_labels(x, y)[1] is y


def test_the_head_has_four_rows_a_class_and_inference_takes_the_unrotated_ones():
    m = _method()
    assert isinstance(m.net.head, LabelAugmentedLinear)
    m.grow(T0)
    m.grow(T1)
    assert m.net.head.linear.n_classes == 16 and m.net.head.n_classes == 4 and m.net.n_classes == 4
    x = torch.randn(5, 1, 4, 4)
    full = m.net(x)["logits"]
    assert full.shape == (5, 16)
    out = m.inference(x)
    assert torch.equal(out["logits"], full[:, [0, 4, 8, 12]])  # the official outputs[:, ::4]
    plain = _method(ssl=False)
    plain.grow(T0)
    assert plain.net.head.linear.n_classes == 2 and plain.inference(x)["logits"].shape == (5, 2)


def test_aggregated_inference_averages_each_rotation_s_own_rows():
    m = _method(inference="aggregate")
    m.grow(T0)
    x = torch.randn(3, 1, 4, 4)
    z = [m.net(torch.rot90(x, k, dims=(2, 3)))["logits"] for k in range(4)]
    expected = sum(z[k][:, [k, 4 + k]] for k in range(4)) / 4  # class c's score: row 4c + k on the image rotated by k
    out = m.inference(x)
    assert torch.allclose(out["logits"], expected, atol=1e-6)
    assert torch.allclose(out["features"], m.net(x)["features"])  # the upright features
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "pass", "method_args": {"inference": "aggregate", "ssl": False}}])
    assert e.value.field == "method_args.inference"


# -- the losses and their weights -------------------------------------------------------------------------


def test_feature_distillation_by_hand():
    f = torch.tensor([[3.0, 0.0], [0.0, 0.0]], requires_grad=True)
    f_old = torch.tensor([[0.0, 4.0], [1.0, 0.0]])
    # per-sample distances 5 and 1; the whole batch's norm sqrt(25 + 1)
    assert feature_distillation(f, f_old).item() == pytest.approx(26 ** 0.5)  # torch.dist(f, f_old, 2)
    assert feature_distillation(f, f_old).item() == pytest.approx(torch.dist(f, f_old, 2).item())
    assert feature_distillation(f, f_old, "sample").item() == pytest.approx(3.0)
    feature_distillation(f, f_old.requires_grad_()).backward()
    assert f_old.grad is None and f.grad is not None  # the teacher gets no gradient


def test_first_task_loss_is_the_ce_of_the_rotated_batch_at_temperature_t():
    m = _method(temperature=0.5)
    m.task = T0
    m.grow(T0)
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 1])
    xs, ys = m.augment_labels(x, y)
    expected = F.cross_entropy(m.net(xs)["logits"] / 0.5, ys)
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("n_pseudo", ["batch", "ratio"])
def test_later_loss_adds_the_weighted_proto_aug_and_distillation_terms(n_pseudo):
    m = _method(lambda_proto=3.0, lambda_kd=5.0, temperature=0.25, n_pseudo=n_pseudo)
    feats = {c: torch.randn(6, 3) + 2 * c for c in range(6)}
    _learn(m, T0, feats)
    _learn(m, T1, feats)
    m.task = T2
    m.grow(T2)
    m.teacher = Teacher(m.net)
    with torch.no_grad():  # the student moves away from its teacher
        for p in m.net.backbone.parameters():
            p.mul_(1.5)
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([4, 5, 5, 4])
    torch.manual_seed(7)
    loss = m.loss(x, y)
    xs, ys = m.augment_labels(x, y)
    f = m.net.backbone(xs)["features"]
    l_cls = F.cross_entropy(m.net.head(f) / 0.25, ys)
    l_kd = torch.dist(f, m.teacher.backbone(xs)["features"], 2)
    n = 4 * (2 if n_pseudo == "ratio" else 1)  # ratio: the batch times n_old // n_new = 4 // 2
    torch.manual_seed(7)
    pseudo, c = proto_augment(m.prototypes[:4], m.radius, n)
    assert c.max() < 4  # old classes only
    l_proto = F.cross_entropy(m.net.head(pseudo) / 0.25, 4 * c)  # the unrotated row of the old class
    assert l_kd.item() > 0
    assert loss.item() == pytest.approx((l_cls + 3.0 * l_proto + 5.0 * l_kd).item(), rel=1e-5)


def test_the_pseudo_features_train_the_head_only():
    m = _method(lambda_kd=0.0)
    feats = {c: torch.randn(6, 3) + 2 * c for c in range(4)}
    _learn(m, T0, feats)
    m.task = T1
    m.grow(T1)
    m.teacher = Teacher(m.net)

    def grads(lambda_proto):
        m.hp.lambda_proto = lambda_proto
        m.net.zero_grad()
        torch.manual_seed(0)
        m.loss(torch.randn(2, 1, 4, 4), torch.tensor([2, 3])).backward()
        return [p.grad.clone() for p in m.net.backbone.parameters()], m.net.head.linear.blocks[0].weight.grad.clone()

    backbone_with, old_rows_with = grads(10.0)
    backbone_without, old_rows_without = grads(0.0)
    assert all(torch.allclose(a, b) for a, b in zip(backbone_with, backbone_without))  # no gradient to the extractor
    assert not torch.allclose(old_rows_with, old_rows_without)  # L_protoAug moves the old classes' rows


# -- state, config, presets, a run -------------------------------------------------------------------------


def test_state_is_tensors_that_load_with_weights_only():
    m = _method()
    _learn(m, T0, FEATS)
    _learn(m, T1, FEATS)
    fresh = reload_through_weights_only(m, _method())
    for key in ("prototypes", "variances", "radius"):
        assert torch.equal(getattr(fresh, key), getattr(m, key))


def test_config_refuses_a_memory_budget_and_bad_options():
    for layer, field in (({"memory": {"size": 100}}, "memory.size"),
                         ({"method_args": {"radius": "last"}}, "method_args.radius"),
                         ({"method_args": {"temperature": 0}}, "method_args.temperature"),
                         ({"model": {"head": "fixed"}}, "model.head")):
        with pytest.raises(ConfigError) as e:
            cilkit.resolve([{"method": "pass", **layer}])
        assert e.value.field == field


def test_presets_resolve_with_the_paper_s_optimizer(tmp_path):
    for name in ("protocols/digits/pass", "protocols/fmnist/pass", "protocols/tin32-cpu/pass", "protocols/tin32-gpu/pass"):
        cfg = cilkit.resolve([load_yaml(name), {"data": {"root": str(tmp_path)}}])
        assert cfg.method == "pass" and cfg.memory.size is None and cfg.train.optimizer == "adam"
    for split in ("b50inc10", "b50inc5", "b40inc3"):
        cfg = cilkit.resolve([load_yaml(f"papers/pass-cifar100-{split}"), {"data": {"root": str(tmp_path)}}])
        assert cfg.train.optimizer == "adam" and cfg.train.lr == 0.001 and cfg.train.batch_size == 64
        assert cfg.model.backbone == "resnet18_cifar" and cfg.method_args == {}


@pytest.mark.slow  # three short runs with the batch under four rotations (tens of seconds on a busy 2-core CPU)
def test_resumed_run_equals_the_uninterrupted_run(run_cut_and_resumed):
    """The prototypes, variances and radius come back from the checkpoint; the pseudo-features' draws from the
    saved RNG states."""
    train = {"epochs": 1, "optimizer": "adam", "lr": 0.001}
    cfg = tiny_cfg("pass", {"radius": "every"}, scenario={"name": "B6-Inc4"}, train=train)
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=1)
    assert len(partial["tasks"]) == 1 and len(resumed["tasks"]) == len(full["tasks"]) == 2
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]
