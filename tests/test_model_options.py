"""model.head (growing | fixed) and model.init (torch | xavier)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from tiny import SMOKE, assert_complete_run, open_task, tiny_driver

import cilkit
from cilkit.errors import ConfigError
from cilkit.experiment import Experiment
from cilkit.losses import masked_ce
from cilkit.methods import METHODS
from cilkit.methods.gem import own_task_ce, task_of_classes
from cilkit.models.heads import FixedLinear, IncrementalLinear
from cilkit.models.network import build_network

FIXED = {"backbone": "mlp", "hidden": [64], "head": "fixed"}
# the methods that work on plain logits, and so with a head that has every class's row from the start (a method
# added later says so with fixed_head = True, and is then smoke-tested below), and those that need per-task blocks
ACCEPT_FIXED = {"agem", "er", "ewc", "finetune", "gem", "icarl", "joint", "lwf", "mas", "oewc", "replay", "si"}
REFUSE_FIXED = {"bic", "coil", "der", "lwm", "podnet", "spb", "spb-i", "spb-m", "ssil", "ucir", "wa"}


# -- model.head: fixed ---------------------------------------------------------------------------


def test_a_fixed_head_has_every_class_from_the_first_task_and_counts_the_tasks():
    net = build_network("mlp", (1, 4, 4), hidden=[8], head="fixed", n_classes=10)
    assert isinstance(net.head, FixedLinear) and net.fixed_head
    net.add_classes(4)
    out = net(torch.randn(3, 1, 4, 4))
    assert out["logits"].shape == (3, 10)
    assert net.task_sizes == [4] and net.n_classes == 4 and net.task_slice(0) == slice(0, 4)
    net.add_classes(6)
    assert net.n_classes == 10 and net.task_slice(1) == slice(4, 10) and net(torch.randn(2, 1, 4, 4))["logits"].shape == (2, 10)
    with pytest.raises(ValueError, match="cannot take"):
        net.add_classes(1)
    growing = build_network("mlp", (1, 4, 4), hidden=[8])
    growing.add_classes(4)
    assert isinstance(growing.head, IncrementalLinear) and not growing.fixed_head
    assert growing(torch.randn(3, 1, 4, 4))["logits"].shape == (3, 4)
    with pytest.raises(ValueError, match="number of classes"):
        build_network("mlp", (1, 4, 4), hidden=[8], head="fixed")


def test_the_ce_over_all_outputs_differs_from_the_ce_over_the_seen_ones():
    logits = torch.tensor([[2.0, 0.5, 3.0, 1.0], [0.0, 1.0, -1.0, 2.5]], requires_grad=True)
    y = torch.tensor([0, 1])
    all_n = F.cross_entropy(logits, y)
    seen = F.cross_entropy(logits[:, :2], y)
    assert all_n.item() > seen.item() + 0.1  # the unseen logits (columns 2, 3) enter the softmax
    (grad,) = torch.autograd.grad(all_n, logits)
    assert (grad[:, 2:] > 0).all()  # and are pushed down


def test_a_fixed_head_pushes_the_unseen_classes_rows_down_from_the_first_step():
    driver = tiny_driver("finetune", model=FIXED)
    task = open_task(driver, 0)
    net, n = driver.net, driver.scenario.n_classes
    assert task.stop < n and net.head.weight.shape[0] == n
    idx = driver.runtime.train_data.indices_of(task.classes)[:32]
    x, y = driver.method.ctx.batch(idx)
    before = net.head.weight.detach().clone()
    groups = driver.method.param_groups(task)
    opt = torch.optim.SGD(groups, lr=0.1)
    loss = driver.method.loss(x, y)
    assert net(x)["logits"].shape[1] == n
    loss.backward()
    unseen = net.head.weight.grad[task.stop:]
    assert unseen.abs().sum(1).gt(0).all()
    opt.step()
    assert not torch.equal(net.head.weight[task.stop:], before[task.stop:])
    # the growing head has no such rows at all
    growing = tiny_driver("finetune")
    open_task(growing, 0)
    assert growing.net.head.weight.shape[0] == task.stop


@pytest.mark.parametrize("method", sorted(name for name, cls in METHODS.items() if not cls.fixed_head))
def test_a_method_built_on_per_task_blocks_refuses_the_fixed_head(method):
    layer = {"method": method, "model": {"backbone": "convnet", "widths": [8, 16], "head": "fixed"}, "memory": {"size": 60}}
    if METHODS[method].memory_use == "none":
        layer.pop("memory")
    expected = rf"'model.head'.*method '{re.escape(method)}' needs the growing head.*use model.head: growing"
    with pytest.raises(ConfigError, match=expected):
        cilkit.resolve([layer])
    layer["model"]["head"] = "growing"
    cilkit.resolve([layer])


def test_the_methods_on_plain_logits_accept_the_fixed_head():
    accepted = {name for name, cls in METHODS.items() if cls.fixed_head}
    assert ACCEPT_FIXED <= accepted and not accepted & REFUSE_FIXED


def test_lwf_warm_up_needs_the_growing_head():
    with pytest.raises(ConfigError, match=r"'method_args.warmup_epochs'.*model.head: fixed"):
        cilkit.resolve([{"method": "lwf", "method_args": {"warmup_epochs": 1}, "model": FIXED}])
    cilkit.resolve([{"method": "lwf", "method_args": {"warmup_epochs": 1}, "model": {"backbone": "mlp"}}])


def test_unknown_head_and_init_are_config_errors():
    with pytest.raises(ConfigError, match=r"'model.head'.*choose one of: auto, growing, fixed"):
        cilkit.resolve([{"model": {"head": "single"}}])
    with pytest.raises(ConfigError, match=r"'model.init'.*choose one of: torch, xavier"):
        cilkit.resolve([{"model": {"init": "kaiming"}}])


def test_new_only_ce_of_a_fixed_head_leaves_the_unseen_classes_out():
    logits = torch.randn(4, 10)
    y = torch.tensor([2, 3, 2, 3])
    assert masked_ce(logits, y, 2, "new", 4).item() == pytest.approx(F.cross_entropy(logits[:, 2:4], y - 2).item())
    assert masked_ce(logits[:, :4], y, 2, "new").item() == pytest.approx(masked_ce(logits, y, 2, "new", 4).item())


def test_gem_own_task_ce_masks_the_unseen_columns_of_a_fixed_head():
    logits = torch.randn(3, 10)
    y = torch.tensor([0, 3, 4])
    tasks = task_of_classes([2, 3])  # 5 seen classes of 10
    expected = own_task_ce(logits[:, :5], y, tasks)
    assert own_task_ce(logits, y, tasks).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("method", sorted(name for name, cls in METHODS.items() if cls.fixed_head))
def test_smoke_run_with_the_fixed_head(method, tmp_path):
    layer = {**SMOKE, "method": method, "model": {**SMOKE["model"], "head": "fixed"}}
    if METHODS[method].memory_use == "required":
        layer["memory"] = {"size": 60}
    exp = Experiment(cilkit.resolve([layer]), tmp_path / method, progress="off")
    widths = set()
    exp.driver.net.head.register_forward_hook(lambda m, i, out: widths.add(out.shape[1]))
    metrics = exp.execute()
    assert_complete_run(metrics, nme=METHODS[method].memory_use == "required")
    assert widths == {exp.scenario.n_classes} == {10}
    assert exp.driver.net.task_sizes == [5, 5]


def test_resume_with_the_fixed_head_equals_the_uninterrupted_run(run_cut_and_resumed):
    layer = {"method": "replay", "train": {"epochs": 1, "batch_size": 64}, "model": {**FIXED, "init": "xavier"},
             "memory": {"size": 60}, "scenario": {"name": "B4-Inc2"}}
    full, partial, resumed = run_cut_and_resumed(cilkit.resolve([layer]), cut_at=2)
    assert len(partial["tasks"]) == 2 and resumed["complete"]
    drop = {"wall_time_s", "train_seconds", "train_images_per_s", "phase_seconds"}

    def figures(m):
        return json.dumps([{k: v for k, v in t.items() if k not in drop} for t in m["tasks"]], sort_keys=True)

    assert figures(resumed) == figures(full)


# -- model.init: xavier ----------------------------------------------------------------------------


def _linears(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


def _assert_xavier(linear: torch.nn.Linear, std_tol: float = 0.1):
    fan_out, fan_in = linear.weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = linear.weight.detach()
    assert w.abs().max().item() <= bound
    assert linear.bias is None or torch.count_nonzero(linear.bias).item() == 0
    xavier_std = math.sqrt(2.0 / (fan_in + fan_out))  # the std of U(-bound, bound)
    assert w.std().item() == pytest.approx(xavier_std, rel=std_tol)


def test_xavier_reaches_every_linear_layer_and_the_head_blocks_added_later():
    torch.manual_seed(0)
    net = build_network("mlp", (1, 16, 16), hidden=[200, 100], init="xavier")
    net.add_classes(50)
    net.add_classes(50)
    linears = _linears(net)
    assert len(linears) == 4  # 2 hidden layers, 2 head blocks
    for m in linears:
        _assert_xavier(m)
    fixed = build_network("mlp", (1, 16, 16), hidden=[200], head="fixed", n_classes=100, init="xavier")
    fixed.add_classes(10)
    for m in _linears(fixed):
        _assert_xavier(m)
    plain = build_network("mlp", (1, 16, 16), hidden=[200])
    plain.add_classes(50)
    assert all(torch.count_nonzero(m.bias) > 0 for m in _linears(plain))  # PyTorch's default: biases drawn


def test_xavier_leaves_the_convolutions_and_a_trained_block_alone():
    torch.manual_seed(0)
    a = build_network("convnet", (1, 8, 8), widths=[4, 8], init="xavier")
    torch.manual_seed(0)
    b = build_network("convnet", (1, 8, 8), widths=[4, 8])
    for (name, p), q in zip(a.backbone.named_parameters(), b.backbone.parameters()):
        assert torch.equal(p, q), name
    a.add_classes(3)
    with torch.no_grad():
        a.head.blocks[0].weight.fill_(5.0)
    a.add_classes(3)
    assert (a.head.blocks[0].weight == 5.0).all()
    _assert_xavier(a.head.blocks[1], std_tol=0.5)


def test_xavier_through_the_config_and_joint_reinit():
    driver = tiny_driver("joint", {"reinit": True}, model={"backbone": "mlp", "hidden": [64], "init": "xavier"})
    open_task(driver, 0)
    for m in _linears(driver.net):
        _assert_xavier(m, std_tol=0.5)
    with torch.no_grad():
        for m in _linears(driver.net):
            m.weight.fill_(9.0)
            m.bias.fill_(1.0)
    open_task(driver, 1)  # reinit: a fresh initialisation, xavier again
    for m in _linears(driver.net):
        _assert_xavier(m, std_tol=0.5)
