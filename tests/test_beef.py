"""BEEF: the energy-based terms and the targets on hand-made tensors, the fused classifier and its fold,
the Langevin samples, the expansion and fusion mechanics, the counts, resume and an end-to-end run."""

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALL_CONVNET, FakeContext, assert_complete_run, open_task, tiny_cfg, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.beef import BEEF, BEEFHead, aligned, energy_loss, forward_mass, pseudo_targets, sgld_objective
from cilkit.models.network import build_network


def _method(hidden=4, **hp):
    net = build_network("mlp", (1, 4, 4), hidden=[hidden])
    return BEEF(BEEF.parse_args(hp), net, FakeContext())


def _grow(m, index, start, stop):
    t = Task(index, start, stop)
    m.task = t
    m.grow(t)
    return t


# -- targets and energy terms by hand ----------------------------------------------------------------


def test_pseudo_targets_map_old_classes_to_their_task_and_new_classes_after_the_backward_prototypes():
    y = torch.tensor([0, 1, 2, 4, 5, 6])
    # tasks {0,1}, {2,3,4}, new {5,6}: old classes -> task index, new -> 2 + (c - 5)
    assert pseudo_targets(y, [2, 3, 2]).tolist() == [0, 0, 1, 1, 2, 3]
    assert pseudo_targets(torch.tensor([0, 3, 1]), [4]).tolist() == [0, 3, 1]  # first task: the labels


def test_logits_alignment_divides_the_backward_prototypes_only():
    z = torch.tensor([[3.4, 1.7, 5.0, -2.0]])
    assert torch.allclose(aligned(z, 2, 1.7), torch.tensor([[2.0, 1.0, 5.0, -2.0]]))
    assert torch.equal(aligned(z, 0, 1.7), z)


def test_forward_mass_and_the_langevin_objective_by_hand():
    train = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    energy = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), math.log(3.0)]])
    # row 1: exp = [1, 1, 1, 2] -> mass 3/5; row 2: [1, 1, 3, 3] -> 6/8
    m = forward_mass(train, energy)
    assert torch.allclose(m, torch.tensor([0.6, 0.75]))
    assert sgld_objective(train, energy, "sample").item() == pytest.approx(math.log(0.6) + math.log(0.75))
    assert sgld_objective(train, energy, "batch").item() == pytest.approx(math.log(1.35))


def test_energy_loss_targets_the_forward_prototype_and_masks_the_own_class_by_hand():
    train = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    energy = torch.tensor([[0.3, -0.2, 0.7], [1.0, 0.0, 2.0]])
    y, pseudo = torch.tensor([2, 0]), torch.tensor([1, 0])
    # row 1: own class column 1 -> 0: logits [1, 0, .3, -.2, .7], target 2 + 2 = 4
    # row 2: own class column 0 -> 0: logits [0, -1, 1, 0, 2], target 2 + 0 = 2
    rows = [torch.tensor([1.0, 0.0, 0.3, -0.2, 0.7]), torch.tensor([0.0, -1.0, 1.0, 0.0, 2.0])]
    expected = -(torch.log_softmax(rows[0], 0)[4] + torch.log_softmax(rows[1], 0)[2]) / 2
    loss = energy_loss(train, energy, y, pseudo, "sample")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert train.grad[0, 1] == 0 and train.grad[1, 0] == 0  # the own class is never pushed down
    assert train.grad[0, 0] > 0 and train.grad[1, 1] > 0  # the others are
    # the official batch-wide mask: columns 0 and 1 (both present in the batch) in every row
    rows_b = [torch.tensor([0.0, 0.0, 0.3, -0.2, 0.7]), torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0])]
    expected_b = -(torch.log_softmax(rows_b[0], 0)[4] + torch.log_softmax(rows_b[1], 0)[2]) / 2
    assert energy_loss(train, energy, y, pseudo, "batch").item() == pytest.approx(expected_b.item(), abs=1e-6)


# -- the fused classifier ----------------------------------------------------------------------------


def _head_two_tasks():
    torch.manual_seed(0)
    h = BEEFHead(d=2)
    h.add_classes(2)  # task 1: 2 classes on F_1
    h.add_classes(3)  # task 2: F_1's classifier folded; 3 new classes, one backward prototype
    with torch.no_grad():
        h.alpha.fill_(0.5)
        h.beta.fill_(-0.25)
    return h


def test_head_shapes_grow_with_the_tasks():
    h = BEEFHead(d=2)
    h.add_classes(2)
    assert h.new_weight.shape == (2, 2) and h.back_weight.shape == (0, 2) and h.fwd_weight.shape == (2, 2)
    h.add_classes(3)
    assert h.old_weight.shape == (2, 2) and not h.old_weight.requires_grad
    assert h.new_weight.shape == (3, 2) and h.back_weight.shape == (1, 2) and h.fwd_weight.shape == (5, 2)
    assert h.alpha.tolist() == [0.0] and h.beta.tolist() == [0.0]
    assert h.new_bias.abs().sum() == 0  # the official SimpleLinear: zero bias


def test_fused_logits_by_hand():
    h = _head_two_tasks()
    f = torch.randn(4, 4)
    f_old, f_new = f[:, :2], f[:, 2:]
    wb, bb = h.back_weight[0], h.back_bias[0]
    old = f_old @ h.old_weight.T + h.old_bias + 1.5 * (f_new @ wb + bb)[:, None] - 0.25
    new = f_new @ h.new_weight.T + h.new_bias
    assert torch.allclose(h(f), torch.cat([old, new], 1), atol=1e-6)
    assert torch.allclose(h.train_logits(f_new), torch.cat([(f_new @ wb + bb)[:, None], new], 1), atol=1e-6)
    # drop_old_bias (the official forward): the old rows lose exactly b_old
    with torch.no_grad():
        h.old_bias.copy_(torch.tensor([1.0, -2.0]))
    before = h(f)
    h.drop_old_bias = True
    assert torch.allclose(before[:, :2] - h(f)[:, :2], torch.tensor([1.0, -2.0]).expand(4, 2), atol=1e-6)
    assert torch.equal(before[:, 2:], h(f)[:, 2:])


def test_folding_keeps_the_fused_logits_of_the_finished_task():
    h = _head_two_tasks()
    with torch.no_grad():
        h.new_bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        h.back_bias.fill_(0.4)
    f = torch.randn(6, 4)
    fused = h(f)
    h.add_classes(2)  # task 3: the 5 classes' fused classifier becomes old_*
    assert h.old_weight.shape == (5, 4) and h.old_bias.shape == (5,)
    assert torch.allclose(F.linear(f, h.old_weight, h.old_bias), fused, atol=1e-6)
    assert torch.all(h.old_weight[2:, :2] == 0)  # task 2's classes have no weight on F_1's features
    assert h.alpha.shape == (2,) and h.back_weight.shape == (2, 2) and h.fwd_weight.shape == (7, 2)
    assert h(torch.randn(3, 6)).shape == (3, 7)


# -- mechanics ---------------------------------------------------------------------------------------


def test_the_new_extractor_starts_from_the_first_or_the_previous_and_the_old_ones_are_frozen():
    for new_init, source in (("first", 0), ("previous", 1)):
        m = _method(new_init=new_init)
        _grow(m, 0, 0, 2)
        _grow(m, 1, 2, 4)
        with torch.no_grad():
            m.extractors[1].layers[0].weight.add_(1.0)  # F_2 differs from F_1
        t2 = _grow(m, 2, 4, 6)
        assert torch.equal(m.extractors[2].layers[0].weight, m.extractors[source].layers[0].weight)
        assert all(not p.requires_grad for e in m.extractors[:2] for p in e.parameters())
        trained = {id(p) for g in m.param_groups(t2) for p in g["params"]}
        assert trained == {id(p) for p in m.extractors[2].parameters()} | {id(p) for p in m.net.head.expansion_parameters()}
        assert id(m.net.head.alpha) not in trained and id(m.net.head.old_weight) not in trained
        assert m.net(torch.randn(2, 1, 4, 4))["logits"].shape == (2, 6)


def test_langevin_step_by_hand_leaves_no_parameter_gradient_and_restores_the_mode():
    m = _method(sgld_steps=1, sgld_noise=0.0, sgld_lr=0.5)
    _grow(m, 0, 0, 3)
    ext, head = m.extractors[0], m.net.head
    ext.train()
    x = torch.randn(5, 1, 4, 4)
    x0 = torch.rot90(x, 2, (2, 3)).requires_grad_(True)
    f = ext(x0)["features"]
    (g,) = torch.autograd.grad(torch.log(forward_mass(head.train_logits(f), head.energy_logits(f))).sum(), x0)
    out = m.langevin(x)
    assert torch.allclose(out, x0.detach() - 0.5 * g, atol=1e-6)
    assert not out.requires_grad and ext.training
    assert all(p.grad is None for p in m.net.parameters())
    # the samples move towards the known classes: the forward prototypes' mass falls
    m2 = _method(sgld_steps=3, sgld_noise=0.0, sgld_lr=5.0)
    _grow(m2, 0, 0, 3)
    with torch.no_grad():
        mass = lambda z: forward_mass(m2.net.head.train_logits(m2.extractors[0](z)["features"]),
                                      m2.net.head.energy_logits(m2.extractors[0](z)["features"])).sum()
        start = mass(torch.rot90(x, 2, (2, 3)))
    end = mass(m2.langevin(x))
    assert end < start


def test_expansion_loss_is_the_aligned_ce_plus_the_weighted_energy_term():
    m = _method(energy_weight=0.0)
    _grow(m, 0, 0, 2)
    t = _grow(m, 1, 2, 4)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 2, 0])
    z = m.net.head.train_logits(m.extractors[1](x)["features"])
    expected = F.cross_entropy(torch.cat([z[:, :1] / 1.7, z[:, 1:]], 1), torch.tensor([0, 0, 1, 2, 1, 0]))
    assert m.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert t.index == 1
    m.hp.energy_weight, m.hp.sgld_noise = 0.5, 0.0
    torch.manual_seed(1)
    xs = m.langevin(x)
    fs = m.extractors[1](xs)["features"]
    e = energy_loss(m.net.head.train_logits(fs), m.net.head.energy_logits(fs), y, torch.tensor([0, 0, 1, 2, 1, 0]))
    assert m.loss(x, y).item() == pytest.approx(expected.item() + 0.5 * e.item(), rel=1e-5)


def _record_fits(m):
    calls = []
    original = m.ctx.fit

    def recording(groups, indices, stage, loss, **kw):
        calls.append({"groups": groups, "indices": indices, "stage": stage, "train_mode": kw["train_mode"]})
        return original(groups, indices, stage, loss, **kw)

    m.ctx.fit = recording
    return calls


def test_fusion_learns_alpha_beta_only_on_a_balanced_subset_and_counts_are_recorded():
    d = tiny_driver("beef", {"fusion_epochs": 2, "energy_weight": 0.0}, model=SMALL_CONVNET)
    m = d.method
    t0, t1 = d.scenario.tasks[:2]
    d.run_task(t0)
    open_task(d, 1)
    subset = m.fusion_subset(t1)
    counts = torch.bincount(d.runtime.train_data.labels[subset].cpu(), minlength=t1.stop)
    assert len(set(counts.tolist())) == 1 and counts[0] == 60 // t0.stop  # the old quota for every class
    backbone = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in m.net.head.state_dict().items()}
    fits = _record_fits(m)
    m.after_task(t1)
    (fit,) = fits
    assert [id(p) for g in fit["groups"] for p in g["params"]] == [id(m.net.head.alpha), id(m.net.head.beta)]
    assert fit["stage"].epochs == 2 and fit["stage"].lr == 0.05 and fit["stage"].schedule == "cosine"
    m.net.train()
    fit["train_mode"]()
    assert not any(mod.training for mod in m.net.modules())  # BatchNorm statistics frozen too
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in backbone.items())
    after = m.net.head.state_dict()
    assert [k for k in head if not torch.equal(head[k], after[k])] == ["alpha", "beta"]
    assert {len(v) for v in m.memory.exemplars.values()} == {60 // t1.stop}
    c = m.task_metrics()
    assert c["extractors"] == 2 and c["exemplars"] == 60 and c["parameters_fusion"] == 2
    extractor = sum(p.numel() for p in m.extractors[0].parameters())
    assert c["parameters"] == 2 * extractor + t1.stop * (2 * m.net.head.d + 1)
    assert c["parameters_trained"] == extractor + sum(p.numel() for p in m.net.head.expansion_parameters())


def test_bad_fusion_rate_for_adam_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method_args.fusion_lr"):
        cilkit.resolve([{"method": "beef", "method_args": {"fusion_optimizer": "adam"}, "memory": {"size": 60}}])
    with pytest.raises(ConfigError, match=r"method_args.energy_mask"):
        cilkit.resolve([{"method": "beef", "method_args": {"energy_mask": "row"}, "memory": {"size": 60}}])


def test_resume_round_trip_after_two_tasks():
    args = {"fusion_epochs": 1}
    d = tiny_driver("beef", args)
    for t in d.scenario.tasks[:2]:
        d.run_task(t)
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    d2 = tiny_driver("beef", args)
    d2.load_state_dict(torch.load(buf, weights_only=False))
    sd, sd2 = d.net.state_dict(), d2.net.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert d2.method.param_counts == d.method.param_counts and len(d2.method.param_counts) == 2
    t1 = d.scenario.tasks[1]
    assert d2.evaluate(t1)["cnn"]["top1"] == d.evaluate(t1)["cnn"]["top1"]


def test_resumed_run_equals_the_uninterrupted_run(run_cut_and_resumed):
    full, partial, resumed = run_cut_and_resumed(tiny_cfg("beef", {"fusion_epochs": 1, "sgld_steps": 1}), cut_at=2)
    assert len(partial["tasks"]) == 2 and len(resumed["tasks"]) == len(full["tasks"])
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"] and a["nme"] == b["nme"]
    assert_complete_run(full, n_tasks=5, floor=(50.0, 25.0), nme=True)
    # the budgets recorded with every task: one extractor more, the exemplar budget, a wider fused classifier
    tasks = full["tasks"]
    assert [t["extractors"] for t in tasks] == [1, 2, 3, 4, 5]
    assert [t["exemplars"] for t in tasks] == [60 // n * n for n in (2, 4, 6, 8, 10)] == [t["memory_size"] for t in tasks]
    assert all(b["parameters"] > a["parameters"] for a, b in itertools.pairwise(tasks))
    assert [t["parameters_fusion"] for t in tasks] == [0, 2, 4, 6, 8]
