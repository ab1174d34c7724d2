import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALL_CONVNET, SMOKE, FakeContext, assert_complete_run, open_task, smoke_run, tiny_cfg, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.experiment import Experiment
from cilkit.losses.pod import nca_loss, pod_flat, pod_spatial
from cilkit.methods.base import Teacher
from cilkit.methods.podnet import PODNet, kmeans_proxies
from cilkit.models.heads import LocalSimilarityClassifier
from cilkit.models.network import build_network
from cilkit.presets import load_yaml, preset_names
from cilkit.training.stage import Stage


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


# -- configuration: the official code's options, and what is refused ---------------------------------

OFFICIAL = {"flat_loss": "cosine", "nca_compat": True, "nca_hinge": False, "similarity": "neg_sq_distance",
            "grad_clamp": 5.0, "zero_residual": True, "finetune_bn": "train", "finetune_optimizer": "sgd"}
OFFICIAL_NETWORK = {"resnet32": {"block_relu": False, "penultimate_map": True},  # "rebuffi", my_resnet.py
                    "resnet18": {"stage_relu": False}}  # resnet.py


def test_backbone_kwargs_pass_only_what_differs_from_the_default_network():
    assert PODNet.backbone_kwargs(PODNet.parse_args({})) == {"last_relu": False}
    hp = PODNet.parse_args({"block_relu": False, "zero_residual": True, "penultimate_map": True})
    assert PODNet.backbone_kwargs(hp) == {"last_relu": False, "block_relu": False, "zero_residual": True,
                                          "penultimate_map": True}
    net = build_network("resnet32", (3, 32, 32), **PODNet.backbone_kwargs(hp))
    assert len(net.backbone(torch.randn(2, 3, 32, 32))["maps"]) == 4  # the official attention list
    assert not any(b.relu for s in net.backbone.stages for b in s)


PAPERS = ["podnet-cifar100-b0inc10", "podnet-cifar100-b50inc1", "podnet-cifar100-b50inc2", "podnet-cifar100-b50inc5",
          "podnet-cifar100-b50inc10", "podnet-imagenet100"]


@pytest.mark.parametrize("preset", PAPERS)
def test_papers_presets_select_the_official_code(preset):
    merged = load_yaml(f"papers/{preset}")
    backbone = merged["model"]["backbone"]
    args = merged["method_args"]
    expected = {**OFFICIAL, **OFFICIAL_NETWORK[backbone]}
    assert {k: args.get(k) for k in expected} == expected
    if backbone == "resnet18":
        assert (args["lambda_spatial"], args["lambda_flat"], args["finetune_lr"]) == (8.0, 10.0, 0.01)
    hp = PODNet.parse_args(args)  # every key is an option, every value in range
    cfg = SimpleNamespace(model=SimpleNamespace(backbone=backbone))
    PODNet.check_config(cfg, hp)  # and the backbone honours them
    assert PODNet.needs_maps(hp)
    net = build_network(backbone, (3, 32, 32), **PODNet.backbone_kwargs(hp))
    assert len(net.backbone(torch.randn(2, 3, 32, 32))["maps"]) == 4


def test_the_preset_list_is_complete():
    assert sorted(p.removeprefix("papers/") for p in preset_names() if p.startswith("papers/podnet-")) == sorted(PAPERS)


def test_mlp_backbone_is_refused_while_pod_spatial_is_on():
    with pytest.raises(ConfigError) as e:
        tiny_cfg("podnet")
    assert e.value.field == "model.backbone" and "podnet" in e.value.message
    assert tiny_cfg("podnet", {"lambda_spatial": 0.0}).model.backbone == "mlp"  # POD-flat alone needs no maps


def test_an_sgd_rate_for_an_adam_finetuning_is_refused():
    with pytest.raises(ConfigError) as e:
        tiny_cfg("podnet", {"finetune_optimizer": "adam", "finetune_lr": 0.05}, model=SMALL_CONVNET)
    assert e.value.field == "method_args.finetune_lr"
    assert tiny_cfg("podnet", {"finetune_optimizer": "adam", "finetune_lr": 1e-3}, model=SMALL_CONVNET)


@pytest.mark.parametrize("option", [{"block_relu": False}, {"stage_relu": False}, {"zero_residual": True},
                                    {"penultimate_map": True}])
def test_network_options_are_refused_without_residual_blocks(option):
    with pytest.raises(ConfigError) as e:
        tiny_cfg("podnet", option, model=SMALL_CONVNET)
    assert e.value.field == f"method_args.{next(iter(option))}" and "residual blocks" in e.value.message


# -- the balanced finetuning: its optimizer and BatchNorm --------------------------------------------


def test_finetuning_has_its_own_optimizer_whatever_train_optimizer_is():
    m = _method("convnet", finetune_epochs=3, finetune_lr=0.02)
    m.ctx = FakeContext(stage=Stage(epochs=9, lr=1e-3, optimizer="adam", schedule="cosine"), seed=0)
    m.update_memory = lambda task: None
    m.ctx.memory = SimpleNamespace(indices=lambda: torch.arange(4), selection="herding")
    _grow(m, 0, 0, 2)
    m.after_task(_grow(m, 1, 2, 4))
    (fit,) = m.ctx.fits
    stage = fit["stage"]
    assert (stage.optimizer, stage.lr, stage.epochs, stage.schedule) == ("sgd", 0.02, 3, "constant")
    assert [p for g in fit["groups"] for p in g["params"]] == list(m.net.head.blocks)


def _bn_stats(net):
    return {k: v.clone() for k, v in net.backbone.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("finetune_bn", ["frozen", "train"])
def test_finetuning_batchnorm_frozen_or_re_estimated(finetune_bn):
    d = tiny_driver("podnet", {"finetune_epochs": 1, "finetune_bn": finetune_bn}, model=SMALL_CONVNET)
    m = d.method
    d.run_task(d.scenario.tasks[0])
    t1 = open_task(d, 1)
    stats = _bn_stats(m.net)
    weights = {k: v.clone() for k, v in m.net.backbone.state_dict().items() if k not in stats}
    proxies = torch.cat(list(m.net.head.blocks)).detach().clone()
    updates, update = [], m.memory.update
    m.memory.update = lambda *a, **k: updates.append(a[0]) or update(*a, **k)
    m.after_task(t1)
    after = _bn_stats(m.net)
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in weights.items())  # never stepped
    assert not torch.equal(torch.cat(list(m.net.head.blocks)), proxies)
    moved = [k for k in stats if not torch.equal(stats[k], after[k])]
    if finetune_bn == "frozen":
        assert moved == [] and len(updates) == 1
    else:  # re-estimated on the balanced memory; then the new classes' herding is redone with them
        assert moved and len(updates) == 2 and list(updates[1]) == list(t1.classes)
    assert {len(v) for v in m.memory.exemplars.values()} == {60 // t1.stop} and len(m.memory.exemplars) == t1.stop


@pytest.mark.slow
def test_smoke_run_of_the_official_configuration(tmp_path):
    """Every official option at once, on the official CIFAR network (resnet32), two digit tasks (~30 s)."""
    args = {**OFFICIAL, **OFFICIAL_NETWORK["resnet32"], "finetune_epochs": 2}
    layer = {**SMOKE, "model": {"backbone": "resnet32"}, "method": "podnet", "method_args": args, "memory": {"size": 60}}
    exp = Experiment(cilkit.resolve([layer]), tmp_path / "official", progress="off")
    assert_complete_run(exp.execute(), nme=True)
    assert len(exp.method.net.backbone(torch.zeros(1, 1, 8, 8))["maps"]) == 4
