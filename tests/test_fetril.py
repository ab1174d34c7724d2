"""FeTrIL: the translation sources, the pseudo-features, the SVM and FC classifiers, the frozen extractor, resume."""


import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, reload_through_weights_only, smoke_run, tiny_cfg, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods import fetril as fetril_module
from cilkit.methods.fetril import FeTrIL, fit_linear_svm, pseudo_features, translation_sources
from cilkit.models.network import build_network
from cilkit.presets import load_yaml
from cilkit.training.stage import Stage

T0, T1 = Task(0, 0, 2), Task(1, 2, 4)


def _method(hidden=2, **hp):
    net = build_network("mlp", (1, 8, 8), hidden=[hidden])
    return FeTrIL(FeTrIL.parse_args(hp), net, FakeContext(stage=Stage(epochs=7, lr=0.1, batch_size=4)))


def _learn(m, task, feats):
    m.task = task
    m.grow(task)
    m.extract = lambda c: feats[c]
    m.after_task(task)


# hand-made 2-d features: four classes in the four corners, each with its own spread
FEATS = {
    0: torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    1: torch.tensor([[10.0, 0.0], [11.0, 0.0], [10.0, 1.0]]),
    2: torch.tensor([[0.0, 10.0], [2.0, 10.0], [0.0, 12.0], [2.0, 12.0], [1.0, 11.0]]),
    3: torch.tensor([[10.0, 10.0], [10.5, 10.0], [10.0, 10.5], [10.5, 10.5], [10.0, 10.0], [10.5, 10.5]]),
}


def test_translation_sources_closest_by_distance_or_cosine_and_random():
    old = torch.tensor([[1.0, 0.0], [10.0, 10.0]])
    new = torch.tensor([[1.5, 1.0], [10.0, 0.5], [9.0, 9.0]])
    # old 0: nearest centroid new 0 (distance 1.1, cosine 0.83); most similar direction new 1 (distance 9, cosine 0.999)
    assert translation_sources(old, new).tolist() == [0, 2]
    assert translation_sources(old, new, distance="cosine").tolist() == [1, 2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    r1 = translation_sources(torch.zeros(50, 2), new, "random", generator=g1)
    assert torch.equal(r1, translation_sources(torch.zeros(50, 2), new, "random", generator=g2))
    assert set(r1.tolist()) == {0, 1, 2}


def test_pseudo_features_of_an_old_class_have_its_prototype_as_mean():
    torch.manual_seed(0)
    new_feats = [torch.randn(30, 5) + 3, torch.randn(20, 5) * 2 - 1]
    new_means = torch.stack([f.mean(0) for f in new_feats])
    old_means = torch.randn(3, 5) * 4
    sources = torch.tensor([1, 0, 1])
    pseudo = pseudo_features(new_feats, new_means, old_means, sources)
    assert [len(p) for p in pseudo] == [20, 30, 20]  # as many as the source class has features
    for c, p in enumerate(pseudo):
        assert torch.allclose(p.mean(0), old_means[c], atol=1e-5)  # the old class's prototype
        s = sources[c]
        assert torch.allclose(p - old_means[c], new_feats[s] - new_means[s], atol=1e-6)  # the source's spread, translated


def test_svm_is_one_vs_rest_with_the_two_class_case_mirrored():
    x = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0], [0.2, 0.9], [-1.0, 0.1], [-0.9, -0.2]]), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    w, b = fit_linear_svm(x, y, 3, C=1.0, tol=1e-4)
    assert w.shape == (3, 2) and b.shape == (3,)
    assert (x @ w.T + b).argmax(1).tolist() == y.tolist()
    w2, b2 = fit_linear_svm(x[:4], y[:4], 2, C=1.0, tol=1e-4)
    assert w2.shape == (2, 2) and torch.equal(w2[0], -w2[1]) and torch.equal(b2[0], -b2[1])
    assert (x[:4] @ w2.T + b2).argmax(1).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="lacks classes"):
        fit_linear_svm(x[:4], y[:4], 3, C=1.0, tol=1e-4)


def test_after_each_task_the_svm_sees_real_new_and_translated_old_features(monkeypatch):
    m = _method()
    seen = []
    real_fit = fetril_module.fit_linear_svm

    def spy(x, y, n, C, tol):
        seen.append((x.clone(), y.clone(), n))
        return real_fit(x, y, n, C, tol)

    monkeypatch.setattr(fetril_module, "fit_linear_svm", spy)
    _learn(m, T0, FEATS)
    x0, y0, n0 = seen[0]
    assert n0 == 2 and y0.tolist() == [0] * 4 + [1] * 3  # the first task: real features only
    assert torch.allclose(x0, F.normalize(torch.cat([FEATS[0], FEATS[1]]), dim=1))  # L2-normalised (official)
    assert m.svm_weight.shape == (2, 2) and m.means.shape == (2, 2)
    _learn(m, T1, FEATS)
    x1, y1, n1 = seen[1]
    # old class 0 (corner (0.5, 0.5)) is closest to new class 2 (5 features), old class 1 (10.3, 0.3) to class 3 (6)
    assert n1 == 4 and y1.tolist() == [2] * 5 + [3] * 6 + [0] * 5 + [1] * 6
    mu = {c: FEATS[c].mean(0) for c in FEATS}
    pseudo0 = FEATS[2] - mu[2] + mu[0]
    assert torch.allclose(x1[y1 == 0], F.normalize(pseudo0, dim=1), atol=1e-6)
    assert torch.allclose(m.means, torch.stack([mu[c] for c in range(4)]), atol=1e-6)
    assert m.svm_weight.shape == (4, 2) and m.svm_bias.shape == (4,)


def test_svm_inference_scores_the_normalised_features():
    m = _method()
    _learn(m, T0, FEATS)
    _learn(m, T1, FEATS)
    f = torch.tensor([[0.5, 0.4], [10.2, 0.3], [0.8, 11.0], [10.2, 10.1]])
    m.net.forward = lambda x: {"logits": torch.zeros(len(x), 4), "features": f, "maps": []}
    out = m.inference(torch.zeros(4, 1, 8, 8))
    assert torch.allclose(out["logits"], F.normalize(f, dim=1) @ m.svm_weight.T + m.svm_bias)
    # on the unit circle classes 0 and 3 (both on the diagonal) are one direction; 1 and 2 are apart
    assert out["logits"][1:3].argmax(1).tolist() == [1, 2]


def test_fc_variant_trains_only_the_head_on_real_and_pseudo_features():
    torch.manual_seed(0)
    m = _method(classifier="fc", fc_epochs=40, fc_lr=0.5)
    m.ctx._stage = Stage(epochs=7, lr=0.1, batch_size=32)  # one step an epoch: few tiny steps
    _learn(m, T0, FEATS)
    assert m.svm_weight is None  # the first task's head is the one trained with the network
    backbone = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    head_before = m.net.head.weight.detach().clone()
    _learn(m, T1, FEATS)
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in backbone.items())
    assert not torch.equal(m.net.head.weight[:2].detach(), head_before)  # the old rows are trained too (PyCIL)
    f = torch.tensor([[0.5, 0.4], [10.2, 0.3], [0.8, 11.0], [10.2, 10.1]])
    assert m.net.head(f).argmax(1).tolist() == [0, 1, 2, 3]
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(m.inference(x)["logits"], m.net(x)["logits"])


def test_later_tasks_train_no_epoch_on_images():
    m = _method()
    assert m.stage(T0).epochs == 7 and m.stage(T1).epochs == 0
    stage = m.extra_stage(T1, epochs=50, lr=0.05, optimizer="sgd")
    assert stage.epochs == 50 and stage.batch_size == 4


def test_state_is_tensors_that_load_with_weights_only():
    m = _method()
    _learn(m, T0, FEATS)
    _learn(m, T1, FEATS)
    fresh = reload_through_weights_only(m, _method())
    for key in ("means", "svm_weight", "svm_bias"):
        assert torch.equal(getattr(fresh, key), getattr(m, key))


def test_a_memory_budget_is_refused():
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "fetril", "memory": {"per_class": 20}}])
    assert e.value.field == "memory.per_class"
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "fetril", "method_args": {"classifier": "knn"}}])
    assert e.value.field == "method_args.classifier"





def test_protocol_presets_drop_the_protocol_memory():
    for protocol in ("digits", "fmnist", "tin32-cpu"):
        layer = load_yaml(f"protocols/{protocol}/fetril")
        assert layer["method"] == "fetril" and layer["memory"]["size"] is None and "method_args" not in layer
    cfg = cilkit.resolve([load_yaml("protocols/digits/fetril")])
    assert cfg.method == "fetril" and cfg.memory.size is None and cfg.memory.per_class is None

# -- runs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier", ["svm", "fc"])
def test_the_backbone_is_frozen_after_the_first_task(classifier):
    driver = tiny_driver("fetril", {"classifier": classifier, "fc_epochs": 2}, scenario={"name": "B4-Inc3"})
    tasks = driver.scenario.tasks
    driver.run_task(tasks[0])
    after_first = {k: v.clone() for k, v in driver.net.backbone.state_dict().items()}
    record = driver.run_task(tasks[1])
    assert record["train_images"] == 0
    assert all(torch.equal(v, driver.net.backbone.state_dict()[k]) for k, v in after_first.items())
    assert driver.method.means.shape[0] == 7 and record["cnn"]["top1"] > 50


@pytest.mark.parametrize("args", [{}, {"classifier": "fc", "fc_epochs": 1, "source": "random"}])
def test_resumed_run_equals_the_uninterrupted_run(args, run_cut_and_resumed):
    full, partial, resumed = run_cut_and_resumed(tiny_cfg("fetril", args, scenario={"name": "B4-Inc3"}), cut_at=1)
    assert len(partial["tasks"]) == 1 and len(resumed["tasks"]) == len(full["tasks"]) == 3
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "fetril")
    assert_complete_run(metrics, nme=False)
    assert exp.driver.memory is None and metrics["tasks"][1]["train_images"] == 0
