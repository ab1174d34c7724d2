"""DER: growing extractors and classifier, auxiliary targets, frozen old extractors, masks,
sparsity loss, pruning, classifier re-learning, resume and an end-to-end run."""

import io
import itertools
import math

import pytest
import torch
from tiny import SMALL_CONVNET, FakeContext, assert_complete_run, open_task, smoke_run, tiny_cfg, tiny_driver

from cilkit.data.scenario import Task
from cilkit.methods.der import DER, align_new_rows, aux_targets
from cilkit.methods.der.masks import BINARY, PRUNED, MaskedExtractor, anneal_s
from cilkit.models.backbones import MLP, ConvNet, ResNet
from cilkit.models.network import build_network


def _method(hidden=4, **hp):
    net = build_network("mlp", (1, 8, 8), hidden=[hidden])
    return DER(DER.parse_args(hp), net, FakeContext())


def _grow(m, index, start, stop):
    t = Task(index, start, stop)
    m.task = t
    m.grow(t)
    return t


def test_aux_targets_merge_old_classes_into_zero():
    y = torch.tensor([0, 2, 3, 4, 6, 5])
    assert aux_targets(y, n_old=4).tolist() == [0, 0, 0, 1, 3, 2]
    assert aux_targets(y, n_old=0).tolist() == [1, 3, 4, 5, 7, 6]


def test_super_feature_grows_by_d_per_task_and_aux_head_has_new_plus_one_outputs():
    m = _method(hidden=4)
    x = torch.randn(3, 1, 8, 8)
    for t, (start, stop) in enumerate([(0, 2), (2, 5), (5, 7)]):
        _grow(m, t, start, stop)
        n = stop - start
        assert m.net.feature_dim == 4 * (t + 1) and len(m.extractors) == t + 1
        out = m.net(x)
        assert out["features"].shape == (3, 4 * (t + 1)) and out["logits"].shape == (3, stop)
        if t > 0:
            assert m.net.aux_head.in_features == 4 and m.net.aux_head.out_features == n + 1
            assert m.net.aux_head.bias is None  # official use_bias: False
    # the new extractor starts as a copy of the previous one, the old ones are frozen
    assert torch.equal(m.extractors[2].layers[0].weight, m.extractors[1].layers[0].weight)
    assert all(not p.requires_grad for e in m.extractors[:2] for p in e.parameters())
    assert all(p.requires_grad for p in m.extractors[2].parameters())


def test_old_classifier_weights_are_copied_and_new_columns_start_at_zero():
    m = _method(hidden=3)
    _grow(m, 0, 0, 2)
    old = m.net.head.weight.detach().clone()
    _grow(m, 1, 2, 5)
    w = m.net.head.weight.detach()
    assert w.shape == (5, 6) and m.net.head.bias is None
    assert torch.equal(w[:2, :3], old) and torch.equal(w[:2, 3:], torch.zeros(2, 3))
    assert w[2:].abs().sum() > 0
    fresh = _method(hidden=3, reuse_old_fc=False)
    _grow(fresh, 0, 0, 2)
    old = fresh.net.head.weight.detach().clone()
    _grow(fresh, 1, 2, 5)
    assert not torch.equal(fresh.net.head.weight.detach()[:2, :3], old)


def test_weight_align_rescales_new_rows_to_the_old_mean_norm():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]])  # old norms 5, 1; new 10, 2
    gamma = align_new_rows(w, n_old=2)
    assert gamma == pytest.approx(0.5)
    assert torch.allclose(w[2:], torch.tensor([[3.0, 4.0], [0.0, 1.0]]))


def test_mask_annealing_schedule_by_hand():
    assert [anneal_s(i, 5, 4.0) for i in range(5)] == pytest.approx([0.25, 1.1875, 2.125, 3.0625, 4.0])
    assert anneal_s(0, 1, 4.0) == 4.0
    m = _method(hidden=3, mask=True, s_max=4.0)
    _grow(m, 0, 0, 2)
    m.ctx.at.steps = 5  # the loop's position in the epoch: s anneals over its 5 steps
    seen = []
    for step in range(5):
        m.ctx.at.step = step
        m.loss(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
        seen.append(m.extractors[0].masks[0].s)
    assert seen == pytest.approx([0.25, 1.1875, 2.125, 3.0625, 4.0])


def _mlp_masks(s=2.0):
    ext = MaskedExtractor(MLP((1, 2, 2), hidden=[3, 2]), init=1.0, s_max=s)
    h = math.log(3) / s  # sigmoid(s * h) = 3/4
    with torch.no_grad():
        ext.masks[0].e.copy_(torch.tensor([0.0, h, -h]))  # m = 1/2, 3/4, 1/4
        ext.masks[1].e.copy_(torch.tensor([h, h]))  # m = 3/4, 3/4
    ext.set_s(s)
    return ext


def test_sparsity_loss_by_hand():
    ext = _mlp_masks()
    # L_S = (K*c0*|m1| + K*|m1|*|m2|) / (K*c0*c1 + K*c1*c2) = (4*1.5 + 1.5*1.5) / (4*3 + 3*2)
    assert ext.sparsity_loss().item() == pytest.approx(8.25 / 18)
    ext.eval()  # eval uses s_max: here the same s
    assert torch.allclose(ext.masks[0].value(), torch.tensor([0.5, 0.75, 0.25]))


def test_mask_gradient_is_compensated():
    ext = _mlp_masks(s=2.0)
    ext.masks[0].value().sum().backward()
    sig = torch.sigmoid(ext.masks[0].e.detach())
    assert torch.allclose(ext.masks[0].e.grad, sig * (1 - sig))  # not s * sigma(se)(1 - sigma(se))
    plain = MaskedExtractor(MLP((1, 2, 2), hidden=[3, 2]), init=0.5, s_max=2.0, compensate=False)
    plain.set_s(2.0)
    plain.masks[0].value().sum().backward()
    sig2 = torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(plain.masks[0].e.grad, 2 * sig2 * (1 - sig2) * torch.ones(3))


def test_masks_scale_the_layer_outputs():
    ext = _mlp_masks()
    x = torch.randn(5, 1, 2, 2)
    h1 = torch.relu(ext.net.layers[0](x.flatten(1)))  # the hook multiplies the layer's output by m
    assert torch.allclose(h1, torch.relu(torch.nn.functional.linear(x.flatten(1), ext.net.layers[0].weight, ext.net.layers[0].bias)) * torch.tensor([0.5, 0.75, 0.25]))


def _binarise(ext, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in ext.masks:
            mask.e.copy_(torch.randn(mask.e.shape, generator=g))
            mask.e[0] = 1.0  # keep at least one channel per layer
            mask.mode = BINARY


@pytest.mark.parametrize("make", [
    lambda: MLP((1, 4, 4), hidden=[6, 5]),
    lambda: ConvNet(1, (4, 6)),
    lambda: ResNet(1, (4, 8), (1, 1), stem="cifar", shortcut="B"),
    lambda: ResNet(1, (4, 8), (2, 1), stem="cifar", shortcut="A"),
])
def test_pruning_keeps_the_outputs_of_the_binarised_masked_network_and_reduces_parameters(make):
    torch.manual_seed(0)
    ext = MaskedExtractor(make())
    for mod in ext.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    _binarise(ext)
    ext.eval()
    x = torch.randn(6, 1, 4, 4)
    before = ext(x)["features"]
    dense, expected = sum(p.numel() for p in ext.net.parameters()), ext.pruned_params()
    ext.prune()
    assert all(mask.mode == PRUNED for mask in ext.masks)
    assert torch.allclose(ext(x)["features"], before, atol=1e-6)
    assert ext.pruned_params() == expected < dense
    assert sum(p.numel() for p in ext.net.parameters()) == dense  # tensors keep their shapes (resume)


def test_pruned_parameter_counts_by_hand():
    ext = MaskedExtractor(MLP((1, 2, 2), hidden=[3, 2]))
    assert ext.pruned_params() == 4 * 3 + 3 + 3 * 2 + 2  # 23: nothing binarised yet
    with torch.no_grad():
        ext.masks[0].e.copy_(torch.tensor([1.0, 1.0, -1.0]))
        ext.masks[1].e.copy_(torch.tensor([1.0, -1.0]))
    ext.prune()
    assert ext.pruned_params() == (4 * 2 + 2) + (2 * 1 + 1)  # 13
    conv = MaskedExtractor(ConvNet(1, (2, 3)))
    assert conv.pruned_params() == (9 * 2 + 4) + (9 * 2 * 3 + 6)  # 82
    with torch.no_grad():
        conv.masks[0].e.copy_(torch.tensor([1.0, -1.0]))
        conv.masks[1].e.copy_(torch.tensor([1.0, 1.0, -1.0]))
    conv.prune()
    assert conv.pruned_params() == (9 * 1 + 2) + (9 * 1 * 2 + 4)  # 33


def test_warmup_epochs_come_out_of_the_task_schedule():
    d = tiny_driver("der", {"warmup_epochs": 2, "warmup_first_task": False}, train={"epochs": 5, "first_epochs": 4})
    t0, t1 = d.scenario.tasks[:2]
    assert d.method.stage(t0).epochs == 4 and d.method.stage(t1).epochs == 3


def _record_fits(m):
    """Record the keyword arguments of every ``fit`` call the method makes (and still run it)."""
    calls, fit = [], m.ctx.fit

    def recording(groups, indices, stage, loss, **hooks):
        calls.append({"groups": groups, "indices": indices, "stage": stage, **hooks})
        return fit(groups, indices, stage, loss, **hooks)

    m.ctx.fit = recording
    return calls


def test_old_extractor_stays_frozen_in_eval_mode_and_relearning_moves_only_the_classifier():
    d = tiny_driver("der", {"relearn_epochs": 2}, model=SMALL_CONVNET)
    m = d.method
    t0, t1 = d.scenario.tasks[:2]
    d.run_task(t0)
    open_task(d, 1)
    old = {k: v.clone() for k, v in m.extractors[0].state_dict().items()}
    modes = []

    def recording_loss(x, y):
        modes.append((m.extractors[0].training, m.extractors[1].training, m.net.head.training))
        return m.loss(x, y)

    m.fit(m.param_groups(t1), m.train_indices(t1), m.stage(t1), recording_loss)  # 2 epochs, DER's train mode
    assert len(modes) > 2 and set(modes) == {(False, True, True)}
    assert all(torch.equal(v, m.extractors[0].state_dict()[k]) for k, v in old.items())  # incl. BN buffers
    assert all(p.grad is None for p in m.extractors[0].parameters())
    assert not torch.equal(m.extractors[1].stages[0][0].weight, m.extractors[0].stages[0][0].weight)

    subset = m.balanced_subset(t1)
    counts = torch.bincount(d.runtime.train_data.labels[subset].cpu(), minlength=t1.stop)
    assert len(set(counts.tolist())) == 1 and counts[0] == 60 // t0.stop  # the old quota: the smallest class
    backbone = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    head = m.net.head.weight.detach().clone()
    fits = _record_fits(m)
    m.after_task(t1)  # classifier re-learning, then the memory update
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(m.net.head.weight.detach(), head)
    assert {len(v) for v in m.memory.exemplars.values()} == {60 // t1.stop}
    (fit,) = fits  # the re-learning: the classifier alone, every module in eval mode
    assert {id(p) for g in fit["groups"] for p in g["params"]} == {id(p) for p in m.net.head.parameters()}
    assert fit["stage"].epochs == 2
    m.net.train()
    fit["train_mode"]()
    assert not any(mod.training for mod in m.net.modules())


def test_resume_round_trip_after_two_tasks():
    args = {"relearn_epochs": 2, "mask": True, "sparsity_weight": 5.0}
    d = tiny_driver("der", args)
    for t in d.scenario.tasks[:2]:
        d.run_task(t)
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    d2 = tiny_driver("der", args)
    state = torch.load(buf, weights_only=False)
    assert state.keys() == d.state_dict().keys()
    d2.load_state_dict(state)
    sd, sd2 = d.net.state_dict(), d2.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd if isinstance(sd[k], torch.Tensor))
    assert d2.method.state_dict().keys() == d.method.state_dict().keys()
    assert d2.memory.exemplars.keys() == d.memory.exemplars.keys()
    assert all(torch.equal(d2.memory.exemplars[c], d.memory.exemplars[c]) for c in d.memory.exemplars)
    assert [mk.mode for e in d2.method.extractors for mk in e.masks] == [PRUNED] * 2 * len(d.method.extractors[0].masks)
    assert d2.method.param_counts == d.method.param_counts and len(d2.method.param_counts) == 2
    assert not any(p.requires_grad for p in d2.method.extractors[0].parameters())
    t1 = d.scenario.tasks[1]
    assert d2.evaluate(t1)["cnn"]["top1"] == d.evaluate(t1)["cnn"]["top1"]
    d2.run_task(d.scenario.tasks[2])
    assert len(d2.method.extractors) == 3 and d2.net.feature_dim == 3 * 64


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "der", {"relearn_epochs": 2})
    assert_complete_run(metrics, nme=True)
    counts = exp.method.state_dict()["param_counts"]
    assert [c["extractors"] for c in counts] == [1, 2]
    assert all(b["params"] > a["params"] for a, b in itertools.pairwise(counts))
    assert all(c["params_pruned"] == c["params"] for c in counts)  # no masks by default
    assert [t["extractors"] for t in metrics["tasks"]] == [1, 2]  # recorded with each task


def test_resumed_run_equals_the_uninterrupted_run(run_cut_and_resumed):
    cfg = tiny_cfg("der", {"relearn_epochs": 2, "mask": True, "sparsity_weight": 5.0})
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=2)
    assert len(partial["tasks"]) == 2 and len(resumed["tasks"]) == len(full["tasks"])
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"] and a["nme"] == b["nme"]
