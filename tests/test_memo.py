"""MEMO: the shallow/deep split of the backbones, the shared trunk with a specialized block per task,
what is frozen and in eval mode, the loss, the parameter and memory-byte budget, config errors, an
end-to-end run and resume."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALL_CONVNET, FakeContext, assert_complete_run, tiny_cfg

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.memory.budget import exemplars_for, image_bytes, memory_cost
from cilkit.methods.der import aux_targets
from cilkit.methods.memo import MEMO
from cilkit.models.backbones import ResNet, build_backbone, split_backbone, stage_count
from cilkit.models.expandable import SharedExpandableBackbone
from cilkit.models.network import build_network


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the split -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, kw", [
    ("convnet", (1, 8, 8), {"widths": [4, 6, 8]}),
    ("resnet32", (3, 8, 8), {}),
    ("resnet18_cifar", (3, 8, 8), {}),
    ("resnet18", (3, 32, 32), {}),
])
def test_the_split_parts_compose_to_the_backbone(name, shape, kw):
    torch.manual_seed(0)
    bb = build_backbone(name, shape, **kw).eval()
    shallow, deep = split_backbone(bb)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        whole, g = bb(x), shallow(x)
        part = deep(g["map"])
    assert torch.equal(part["features"], whole["features"])
    assert len(g["maps"]) + len(part["maps"]) == len(whole["maps"]) == stage_count(name, kw.get("widths"))
    assert n_params(shallow) + n_params(deep) == n_params(bb) and deep.out_dim == bb.out_dim
    assert len(deep.stages) == 1  # the official split: the last stage is specialized


def test_the_split_parameter_counts_are_the_official_ones():
    # wangkiw/ICLR23-MEMO utils/model2exemplar.py: ResNet-32 463,504 and ResNet-18 11,176,512 parameters;
    # the ResNet-32 costs 603 CIFAR images, and the aligned ("fair") budget of B0-Inc10 is 3312 exemplars.
    r32 = build_backbone("resnet32", (3, 32, 32))
    g, s = split_backbone(r32)
    assert (n_params(r32), n_params(g), n_params(s)) == (463504, 112016, 351488)
    assert n_params(build_backbone("resnet18", (3, 32, 32))) == 11176512
    assert math.floor(memory_cost(463504, 0, (3, 32, 32))["model_in_exemplars"]) == 603
    der, memo = 10 * n_params(r32), n_params(g) + 10 * n_params(s)
    assert 2000 + exemplars_for(der - memo, (3, 32, 32)) == 3312


def test_two_stage_split_and_refusals():
    bb = build_backbone("convnet", (1, 8, 8), widths=[4, 6, 8])
    shallow, deep = split_backbone(bb, deep=2)
    assert len(shallow.stages) == 1 and len(deep.stages) == 2
    with pytest.raises(ValueError, match="1 to 2"):
        split_backbone(bb, deep=3)
    with pytest.raises(ValueError, match="no convolutional stages"):
        split_backbone(build_backbone("mlp", (1, 8, 8), hidden=[4]))
    with pytest.raises(ValueError, match="penultimate_map"):
        split_backbone(ResNet(1, (4, 8), (2, 2), stem="cifar", shortcut="A", penultimate_map=True))
    assert stage_count("mlp") is None and stage_count("convnet", [8, 16]) == 2


def test_shared_backbone_runs_the_trunk_once_and_concatenates_the_blocks():
    torch.manual_seed(0)
    shallow, deep = split_backbone(build_backbone("convnet", (1, 8, 8), widths=[4, 6, 8]))
    bb = SharedExpandableBackbone(shallow, deep).eval()
    new = bb.expand()
    with torch.no_grad():
        new.stages[0][0].weight.add_(0.5)  # the copy is its own block
    calls = []
    shallow.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 1, 8, 8)
    out = bb(x)
    assert len(calls) == 1 and bb.out_dim == 16 and out["features"].shape == (3, 16)
    with torch.no_grad():
        m = shallow(x)["map"]
        assert torch.allclose(out["features"], torch.cat([deep(m)["features"], new(m)["features"]], 1))
    assert len(out["maps"]) == 3 and torch.equal(out["maps"][-1], new(m)["maps"][-1])


# -- the method's structure ---------------------------------------------------------------------------

class _Memory:
    def __init__(self, n):
        self.n = n
        self.updates = 0

    def update(self, classes, indices_of, features):
        self.updates += 1

    def __len__(self):
        return self.n


def _method(n_exemplars=40, **hp):
    torch.manual_seed(0)
    net = build_network("convnet", (1, 8, 8), widths=[4, 6, 8])
    data = types.SimpleNamespace(images=torch.zeros(5, 1, 8, 8, dtype=torch.uint8), indices_of=lambda c: torch.arange(0))
    return MEMO(MEMO.parse_args(hp), net, FakeContext(train_data=data, memory=_Memory(n_exemplars)))


def _grow(m, index, start, stop):
    t = Task(index, start, stop)
    m.task = t
    m.grow(t)
    return t


def test_old_blocks_and_the_shared_trunk_are_frozen_and_the_new_block_trains():
    m = _method()
    _grow(m, 0, 0, 2)
    assert all(p.requires_grad for p in m.net.parameters())  # the first task trains everything
    _grow(m, 1, 2, 4)
    bb = m.net.backbone
    assert not any(p.requires_grad for p in bb.generalized.parameters())
    assert not any(p.requires_grad for p in bb.extractors[0].parameters())
    assert all(p.requires_grad for p in bb.extractors[1].parameters())
    assert m.net.feature_dim == 16 and m.net.head.weight.shape == (4, 16) and m.net.head.bias is not None
    assert (m.net.aux_head.in_features, m.net.aux_head.out_features) == (8, 3)
    # the new block starts as a copy of the previous one
    assert torch.equal(bb.extractors[1].stages[0][0].weight, bb.extractors[0].stages[0][0].weight)
    # one backward pass: gradients reach the new block and the heads only
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 2, 3])
    m.train_mode()
    m.loss(x, y).backward()
    assert all(p.grad is None for p in bb.generalized.parameters()) and all(p.grad is None for p in bb.extractors[0].parameters())
    assert all(p.grad is not None for p in bb.extractors[1].parameters())
    assert m.net.head.weight.grad is not None and m.net.aux_head.weight.grad is not None


def test_pycil_options_train_the_shared_trunk_and_the_old_blocks():
    m = _method(train_shared=True)
    _grow(m, 0, 0, 2)
    _grow(m, 1, 2, 4)
    _grow(m, 2, 4, 6)
    bb = m.net.backbone
    assert all(p.requires_grad for p in bb.generalized.parameters())
    assert not any(p.requires_grad for e in bb.extractors[:2] for p in e.parameters())
    m2 = _method(train_old_specialized=True)
    _grow(m2, 0, 0, 2)
    _grow(m2, 1, 2, 4)
    assert all(p.requires_grad for e in m2.net.backbone.extractors for p in e.parameters())
    assert not any(p.requires_grad for p in m2.net.backbone.generalized.parameters())


def _bn_stats(module):
    return [b.clone() for n, b in module.named_buffers() if n.endswith("running_mean")]


@pytest.mark.parametrize("train_shared", [False, True])
def test_frozen_parts_keep_their_batchnorm_statistics(train_shared):
    m = _method(train_shared=train_shared)
    _grow(m, 0, 0, 2)
    m.train_mode()
    assert all(mod.training for mod in m.net.modules())
    _grow(m, 1, 2, 4)
    bb = m.net.backbone
    m.train_mode()
    shared, old, new = _bn_stats(bb.generalized), _bn_stats(bb.extractors[0]), _bn_stats(bb.extractors[1])
    m.net(torch.randn(8, 1, 8, 8) * 3 + 1)
    assert all(torch.equal(a, b) for a, b in zip(old, _bn_stats(bb.extractors[0])))
    assert all(torch.equal(a, b) for a, b in zip(shared, _bn_stats(bb.generalized))) != train_shared
    assert not any(torch.equal(a, b) for a, b in zip(new, _bn_stats(bb.extractors[1])))


def test_loss_is_ce_plus_weighted_aux_ce_on_the_new_block():
    m = _method(aux_weight=0.5)
    _grow(m, 0, 0, 2)
    x0, y0 = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    m.net.eval()
    assert torch.allclose(m.loss(x0, y0), F.cross_entropy(m.net(x0)["logits"], y0))  # no aux term in the first task
    _grow(m, 1, 2, 5)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 2])
    out = m.net(x)
    aux = m.net.aux_head(out["features"][:, 8:])
    expected = F.cross_entropy(out["logits"], y) + 0.5 * F.cross_entropy(aux, torch.tensor([0, 0, 1, 2, 3, 1]))
    assert torch.allclose(aux_targets(y, 2), torch.tensor([0, 0, 1, 2, 3, 1]))
    assert torch.allclose(m.loss(x, y), expected)


# -- the budget ------------------------------------------------------------------------------------

def test_memory_cost_by_hand():
    c = memory_cost(463504, 2000, (3, 32, 32))
    assert (c["model_bytes"], c["exemplar_bytes"], c["total_bytes"]) == (1854016, 6144000, 7998016)
    assert c["total_mb"] == pytest.approx(7.627, abs=1e-3)  # the paper's 7.6 MB start point on CIFAR-100
    assert image_bytes((1, 28, 28)) == 784 and exemplars_for(784, (1, 28, 28)) == 4


def test_every_task_records_parameters_exemplars_and_bytes():
    m = _method(n_exemplars=40)
    shallow_params = n_params(m.net.backbone.generalized)
    block = n_params(m.net.backbone.extractors[0])
    for t, (start, stop) in enumerate([(0, 2), (2, 4), (4, 6)]):
        task = _grow(m, t, start, stop)
        m.after_task(task)
        r = m.task_metrics()
        backbone = shallow_params + (t + 1) * block
        assert r["specialized_blocks"] == t + 1 and r["parameters_backbone"] == backbone
        assert r["parameters_shared"] == shallow_params and r["parameters_specialized"] == (t + 1) * block
        assert r["parameters"] == backbone + n_params(m.net.head)
        assert r["model_bytes"] == 4 * backbone and r["exemplar_bytes"] == 40 * 64
        assert r["memory_bytes"] == 4 * backbone + 2560 and r["memory_mb"] == pytest.approx((4 * backbone + 2560) / 2**20)
        assert r["model_in_exemplars"] == pytest.approx(4 * backbone / 64)
        assert r["exemplars_saved_vs_der"] == (4 * t * shallow_params) // 64  # DER: t more copies of the trunk
    assert m.memory.updates == 3
    trained = m.state_dict()["param_counts"]
    assert trained[0]["params_trainable"] > trained[1]["params_trainable"]  # later tasks train one block + heads
    m2 = _method()
    m2.load_state_dict(m.state_dict())
    assert m2.param_counts == m.param_counts


def test_weight_aligning_after_a_later_task_rescales_the_new_rows():
    m = _method()
    _grow(m, 0, 0, 2)
    m.after_task(m.task)
    task = _grow(m, 1, 2, 4)
    with torch.no_grad():
        m.net.head.weight[2:] *= 3.0
    m.after_task(task)
    norms = m.net.head.weight.detach().norm(dim=1)
    assert norms[2:].mean().item() == pytest.approx(norms[:2].mean().item(), rel=1e-5)


# -- config, end to end, resume ----------------------------------------------------------------------

def test_a_backbone_without_stages_or_too_many_specialized_stages_is_a_config_error():
    with pytest.raises(ConfigError, match="'model.backbone'.*has none"):
        cilkit.resolve([{"method": "memo", "model": {"backbone": "mlp"}, "memory": {"size": 60}}])
    two = {"method": "memo", "method_args": {"specialized_stages": 2}, "memory": {"size": 60}}
    with pytest.raises(ConfigError, match="'method_args.specialized_stages'.*2 stages"):
        cilkit.resolve([{**two, "model": SMALL_CONVNET}])  # two stages: one must stay shared
    cilkit.resolve([{**two, "model": {"backbone": "resnet32"}}])


def test_the_paper_preset_runs_what_the_official_readme_ran(tmp_path):
    from cilkit.presets import load_yaml

    cfg = cilkit.resolve([load_yaml("papers/memo-cifar100-b0inc10"), {"data": {"root": str(tmp_path)}}])
    assert cfg.method == "memo" and cfg.model.backbone == "resnet32" and str(cfg.scenario.name) == "B0-Inc10"
    assert cfg.method_args["train_shared"] is True  # --train_base
    g, s = split_backbone(build_backbone("resnet32", (3, 32, 32)))
    assert cfg.memory.size == 2000 + exemplars_for(9 * n_params(g), (3, 32, 32)) == 3312  # -ms 3312, "fair"
    t = cfg.train
    assert (t.first_epochs, t.first_milestones, t.epochs, t.milestones) == (200, [60, 120, 170], 170, [80, 120, 150])
    assert (t.first_weight_decay, t.weight_decay, t.batch_size) == (5e-4, 2e-4, 128)


def test_run_records_the_budget_per_task_and_resumes_to_the_same_figures(run_cut_and_resumed):
    cfg = tiny_cfg("memo", model=SMALL_CONVNET, scenario={"name": "B0-Inc4"}, train={"epochs": 1})  # tasks of 4, 4, 2
    full, partial, resumed = run_cut_and_resumed(cfg, cut_at=2)
    tasks = full["tasks"]
    assert_complete_run(full, n_tasks=3, nme=True)
    assert [t["specialized_blocks"] for t in tasks] == [1, 2, 3]
    block = tasks[0]["parameters_specialized"]
    assert [t["parameters_backbone"] - tasks[0]["parameters_backbone"] for t in tasks] == [0, block, 2 * block]
    assert all(t["exemplars"] == t["memory_size"] and t["exemplar_bytes"] == 64 * t["exemplars"] for t in tasks)
    assert all(t["memory_bytes"] == t["model_bytes"] + t["exemplar_bytes"] for t in tasks)
    assert len(partial["tasks"]) == 2 and len(resumed["tasks"]) == 3
    for a, b in zip(resumed["tasks"], tasks):  # grow freezes the trunk again on resume: same figures
        assert a["cnn"] == b["cnn"] and a["nme"] == b["nme"] and a["memory_bytes"] == b["memory_bytes"]
