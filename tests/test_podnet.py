import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, smoke_run

from cilkit.data.scenario import Task
from cilkit.losses.pod import nca_loss, pod_flat, pod_spatial
from cilkit.methods.base import Teacher
from cilkit.methods.podnet import PODNet, kmeans_proxies
from cilkit.models.heads import LocalSimilarityClassifier
from cilkit.models.network import build_network


def _method(backbone="mlp", shape=(1, 8, 8), **hp):
    net = build_network(backbone, shape, hidden=[16], widths=[4, 8, 8], **PODNet.backbone_options)
    return PODNet(PODNet.parse_args(hp), net, FakeContext(seed=0))


def _grow(m, index, start, stop):
    m.task = Task(index, start, stop)
    m.grow(m.task)
    return m.task


# -- POD ------------------------------------------------------------------------------------------


def test_pod_spatial_on_a_hand_made_map():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # squared: [[1, 4], [9, 16]]
    b = torch.ones(1, 1, 2, 2)
    # pooled over H: (10, 20); over W: (5, 25); b gives (2, 2, 2, 2)
    phi_a = torch.tensor([10.0, 20.0, 5.0, 25.0]) / math.sqrt(100 + 400 + 25 + 625)
    phi_b = torch.full((4,), 0.5)
    expected = (phi_a - phi_b).norm().item()
    assert pod_spatial([a], [b]).item() == pytest.approx(expected, rel=1e-6)
    # the sum over the pooled axis, then the normalisation: a rescaled map costs nothing
    assert pod_spatial([a], [3 * a]).item() == pytest.approx(0.0, abs=1e-7)
    # the mean over layers and over the batch
    two = pod_spatial([a, a], [b, a]).item()
    assert two == pytest.approx(expected / 2, rel=1e-6)
    batch = pod_spatial([torch.cat([a, a])], [torch.cat([b, a])]).item()
    assert batch == pytest.approx(expected / 2, rel=1e-6)
    # moving the activation to another row and column is seen; the sign of an activation is not
    assert pod_spatial([a], [a.flip(2)]).item() > 0.1
    assert pod_spatial([a], [-a]).item() == pytest.approx(0.0, abs=1e-7)
    assert pod_spatial([], []).item() == 0.0  # an MLP has no maps


def test_pod_flat_l2_and_cosine():
    old = torch.tensor([[3.0, 0.0]])
    new = torch.tensor([[0.0, 4.0]])
    assert pod_flat(old, new, "l2").item() == pytest.approx(5.0)
    assert pod_flat(old, new, "cosine").item() == pytest.approx(1.0)
    assert pod_flat(old, 2 * old, "cosine").item() == pytest.approx(0.0, abs=1e-7)


# -- the Local Similarity Classifier and its loss ----------------------------------------------------


def test_lsc_merges_proxies_by_softmax_over_their_similarities():
    lsc = LocalSimilarityClassifier(2, proxies=2)
    lsc.add_classes(2)
    with torch.no_grad():  # class 0: proxies along +x and +y; class 1: along -x and -y (norms do not matter)
        lsc.blocks[0].copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [0.0, -3.0]]))
    yhat = lsc(torch.tensor([[3.0, 0.0]]))  # similarities: class 0 (1, 0), class 1 (-1, 0)
    e = math.e
    assert yhat.shape == (1, 2) and lsc.n_classes == 2
    assert yhat[0, 0].item() == pytest.approx(e / (e + 1), rel=1e-6)
    assert yhat[0, 1].item() == pytest.approx(-1 / (e + 1), rel=1e-6)
    lsc.add_classes(3)
    assert lsc.n_classes == 5 and lsc.blocks[1].shape == (6, 2) and lsc(torch.randn(4, 2)).shape == (4, 5)
    # the official code's similarity: -||h - theta||^2 = 2 cos - 2 before the merge
    code = LocalSimilarityClassifier(2, proxies=2, similarity="neg_sq_distance")
    code.add_classes(2)
    with torch.no_grad():
        code.blocks[0].copy_(lsc.blocks[0])
    s = torch.tensor([0.0, -2.0])  # class 0
    assert code(torch.tensor([[3.0, 0.0]]))[0, 0].item() == pytest.approx((F.softmax(s, 0) * s).sum().item(), rel=1e-6)


def test_nca_margin_counts_in_the_paper_form_and_cancels_in_the_official_code():
    yhat = torch.tensor([[0.5, 0.2, -0.1]])
    y = torch.tensor([0])
    eta = torch.tensor(2.0)
    # paper: log(e^{0.4} + e^{-0.2}) - 2 (0.5 - 0.6); the positive is not in the denominator
    paper = math.log(math.exp(0.4) + math.exp(-0.2)) - 2 * (0.5 - 0.6)
    assert nca_loss(yhat, y, eta, 0.6, hinge=False).item() == pytest.approx(paper, rel=1e-6)
    assert nca_loss(yhat, y, eta, 0.0, hinge=False).item() == pytest.approx(paper - 1.2, rel=1e-6)
    # the hinge clamps a sample that wins by the margin at 0
    easy = torch.tensor([[0.9, -0.5, -0.5]])
    assert nca_loss(easy, y, torch.tensor(10.0), 0.6, hinge=False).item() < 0
    assert nca_loss(easy, y, torch.tensor(10.0), 0.6, hinge=True).item() == 0.0
    # official: log(sum_{i != y} e^{eta yhat_i} + e^{eta max yhat}) - eta yhat_y, whatever the margin
    code = math.log(math.exp(0.4) + math.exp(-0.2) + math.exp(1.0)) - 1.0
    for margin in (0.0, 0.6, 3.0):
        assert nca_loss(yhat, y, eta, margin, hinge=False, compat=True).item() == pytest.approx(code, rel=1e-6)


def test_the_margin_term_gives_eta_no_gradient_unless_asked():
    yhat = torch.tensor([[0.1, 0.0, -0.1]])
    y = torch.tensor([0])
    grads = {}
    for margin_grad in (False, True):
        eta = torch.tensor(1.0, requires_grad=True)
        nca_loss(yhat, y, eta, 0.6, hinge=False, margin_grad=margin_grad).backward()
        grads[margin_grad] = eta.grad.item()
    p = F.softmax(torch.tensor([0.0, -0.1]), 0)
    weighted = (p * torch.tensor([0.0, -0.1])).sum().item()
    assert grads[False] == pytest.approx(weighted - 0.1, rel=1e-5)
    assert grads[True] == pytest.approx(weighted - 0.1 + 0.6, rel=1e-5)  # > 0: SGD would shrink eta


# -- the method's mechanics --------------------------------------------------------------------------


def test_old_proxies_stay_fixed_through_a_training_step():
    m = _method("convnet")
    _grow(m, 0, 0, 2)
    task = _grow(m, 1, 2, 4)
    m.teacher = Teacher(m.net)
    old = m.net.head.blocks[0].detach().clone()
    new = m.net.head.blocks[1].detach().clone()
    eta = m.net.head.eta.item()
    conv = m.net.backbone.stages[0][0].weight.detach().clone()
    opt = torch.optim.SGD(m.param_groups(task), lr=0.5, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 4
    for _ in range(2):
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(m.net.head.blocks[0], old)
    assert not torch.equal(m.net.head.blocks[1], new)
    assert m.net.head.eta.item() != eta and not torch.equal(m.net.backbone.stages[0][0].weight, conv)


def test_distillation_terms_are_weighted_by_the_adaptive_factor():
    m = _method("convnet", nca_hinge=False)
    _grow(m, 0, 0, 2)
    _grow(m, 1, 2, 4)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 4
    m.teacher = Teacher(m.net)
    torch.nn.init.normal_(m.teacher.module.backbone.stages[0][0].weight)  # a teacher that differs
    m.net.eval()
    with torch.no_grad():
        out, old = m.net(x), m.teacher.backbone(x)
        expected = m.classification_loss(out["logits"], y) + math.sqrt(4 / 2) * (
            3.0 * pod_spatial(old["maps"], out["maps"]) + 1.0 * pod_flat(old["features"], out["features"])
        )
        assert pod_spatial(old["maps"], out["maps"]) > 0
        assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kmeans_imprinting_gives_k_scaled_unit_proxies_per_class():
    m = _method(proxies=3)
    _grow(m, 0, 0, 2)
    with torch.no_grad():
        m.net.head.blocks[0].copy_(F.normalize(torch.randn(6, 16), dim=1) * 2.5)  # old proxies of norm 2.5
    task = _grow(m, 1, 2, 4)
    centres = torch.eye(16)[:3] * 4.0
    feats = {c: torch.cat([centres[j] + 0.05 * torch.randn(20, 16) for j in range(3)]) for c in task.classes}
    m.class_features = lambda c: feats[c]
    m.imprint(task)
    new = m.net.head.blocks[1].detach()
    assert new.shape == (2 * 3, 16)
    assert torch.allclose(new.norm(dim=1), torch.full((6,), 2.5), atol=1e-5)
    for c in range(2):  # each class's three proxies point at its three clusters, in some order
        cos = F.normalize(new[3 * c : 3 * c + 3], dim=1) @ F.normalize(centres, dim=1).T
        assert torch.allclose(cos.max(1).values, torch.ones(3), atol=1e-2)
        assert sorted(cos.argmax(1).tolist()) == [0, 1, 2]
    assert torch.equal(kmeans_proxies(feats[2], 3, seed=0), kmeans_proxies(feats[2], 3, seed=0))
    assert kmeans_proxies(feats[2][:2], 3).shape == (3, 16)  # fewer samples than proxies


def test_gradient_clamp_option():
    m = _method(grad_clamp=1e-3)
    _grow(m, 0, 0, 2)
    m._clamp_gradients(1e-3)
    m.loss(torch.randn(8, 1, 8, 8) * 50, torch.arange(8) % 2).backward()
    largest = max(p.grad.abs().max().item() for p in m.net.parameters() if p.grad is not None)
    assert largest == pytest.approx(1e-3)  # some gradient was larger and is clamped


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "podnet", {"finetune_epochs": 2})
    assert_complete_run(metrics, nme=True)
    head = exp.method.net.head
    assert isinstance(head, LocalSimilarityClassifier) and head.n_classes == 10 and head.weight.shape[0] == 10 * 10
