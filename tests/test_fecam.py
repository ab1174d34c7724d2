"""FeCAM: Tukey's transform, shrinkage, correlation, the Mahalanobis classifier, the frozen extractor, resume."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import FakeContext, assert_complete_run, smoke_run, tiny_cfg, tiny_driver

import cilkit
from cilkit.data.scenario import Task
from cilkit.errors import ConfigError
from cilkit.methods.fecam import FeCAM, correlation, covariance, mahalanobis, normalized_diagonal, shrink, tukey
from cilkit.models.heads import CosineLinear
from cilkit.models.network import build_network
from cilkit.presets import load_yaml
from cilkit.training.stage import Stage

T0, T1 = Task(0, 0, 2), Task(1, 2, 3)


def _method(hidden=2, **hp):
    net = build_network("mlp", (1, 8, 8), hidden=[hidden])
    return FeCAM(FeCAM.parse_args(hp), net, FakeContext(stage=Stage(epochs=7, lr=0.1)))


def _learn(m, task, feats):
    """Run ``task``'s statistics on hand-made features (``feats``: class -> [n, d])."""
    m.task = task
    m.grow(task)
    m.extract = lambda c: feats[c]
    m.after_task(task)


# hand-made non-negative 2-d features: class 0 spread along x, class 1 along y, class 2 around (4, 4)
FEATS = {
    0: torch.tensor([[1.0, 1.0], [4.0, 1.2], [9.0, 0.8], [16.0, 1.0]]),
    1: torch.tensor([[1.0, 1.0], [1.1, 4.0], [0.9, 9.0], [1.0, 16.0]]),
    2: torch.tensor([[16.0, 16.0], [15.0, 17.0], [17.0, 15.0]]),
}


# -- the statistics by hand ------------------------------------------------------------------------------


def test_covariance_is_numpys_unbiased_one():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 5.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(covariance(x), torch.from_numpy(np.cov(x.numpy().T)))
    assert torch.equal(covariance(x[:1]), torch.zeros(3, 3, dtype=torch.float64))


def test_shrinkage_adds_the_mean_variance_and_the_mean_nonzero_covariance():
    cov = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    # V1 = (4 + 2) / 2 = 3, V2 = 1: S + 3 I + 1 (1 - I)
    assert torch.allclose(shrink(cov, 1.0, 1.0), torch.tensor([[7.0, 2.0], [2.0, 5.0]]))
    assert torch.allclose(shrink(cov, 0.5, 0.0), torch.tensor([[5.5, 1.0], [1.0, 3.5]]))
    # the official shrink_cov averages the non-zero off-diagonal entries only: (1 + 1) / 2, not 2 / 6
    cov3 = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    expected = cov3 + 2.0 * torch.eye(3) + 1.0 * (1 - torch.eye(3))
    assert torch.allclose(shrink(cov3, 1.0, 1.0), expected)


def test_correlation_normalisation_and_the_normalised_diagonal():
    cov = torch.tensor([[7.0, 2.0], [2.0, 5.0]])
    corr = correlation(cov)
    assert torch.allclose(corr, torch.tensor([[1.0, 2 / math.sqrt(35)], [2 / math.sqrt(35), 1.0]]))
    dead = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # a dimension without variance: no NaN
    assert torch.equal(correlation(dead), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(normalized_diagonal(torch.tensor([[3.0, 1.0], [1.0, 4.0]])), torch.diag(torch.tensor([0.6, 0.8])))
    assert torch.allclose(tukey(torch.tensor([4.0, 0.0, 9.0]), 0.5), torch.tensor([2.0, 0.0, 3.0]))


def test_mahalanobis_by_hand_per_class_and_shared():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    means = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    per_class = torch.stack([torch.diag(torch.tensor([2.0, 1.0])), torch.eye(2)])
    # x0: class 0: 2*1 + 0 = 2; class 1: (0, -1) -> 1.  x1: class 0: 0 + 4 = 4; class 1: (-1, 1) -> 2
    assert torch.allclose(mahalanobis(x, means, per_class), torch.tensor([[2.0, 1.0], [4.0, 2.0]]))
    shared = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    diff = x[:, None] - means[None]
    expected = torch.einsum("bcd,de,bce->bc", diff, shared[0], diff)
    assert torch.allclose(mahalanobis(x, means, shared), expected)


# -- the method on hand-made features -----------------------------------------------------------------------


def test_statistics_are_the_transformed_prototypes_and_the_inverse_shrunk_correlations():
    m = _method()
    _learn(m, T0, FEATS)
    assert m.prototypes.shape == (2, 2) and m.precisions.shape == (2, 2, 2)
    for c in (0, 1):
        z = FEATS[c].double().sqrt()
        assert torch.allclose(m.prototypes[c].double(), z.mean(0), atol=1e-6)  # mean of x^0.5 (prototype: transformed)
        expected = torch.linalg.pinv(correlation(shrink(torch.from_numpy(np.cov(z.numpy().T)), 1.0, 1.0)))
        assert torch.allclose(m.precisions[c].double(), expected, atol=1e-5)
    _learn(m, T1, FEATS)  # the third class is appended, the first two unchanged
    assert m.prototypes.shape == (3, 2) and m.precisions.shape == (3, 2, 2)
    assert torch.allclose(m.prototypes[2].double(), FEATS[2].double().sqrt().mean(0), atol=1e-6)


def test_logits_are_minus_the_distances_of_the_normalised_transformed_features():
    m = _method()
    _learn(m, T0, FEATS)
    _learn(m, T1, FEATS)
    f = torch.tensor([[12.0, 1.5], [1.2, 12.0], [16.5, 16.0]])
    z = F.normalize(f.sqrt(), dim=1)
    mu = F.normalize(m.prototypes, dim=1)
    expected = torch.stack([torch.einsum("bd,de,be->b", z - mu[c], m.precisions[c], z - mu[c]) for c in range(3)], 1)
    assert torch.allclose(m.distances(f), expected, atol=1e-5)
    m.net.forward = lambda x: {"logits": torch.zeros(len(x), 3), "features": f, "maps": []}
    out = m.inference(torch.zeros(3, 1, 8, 8))
    assert torch.allclose(out["logits"], -expected, atol=1e-5) and torch.equal(out["features"], f)
    assert out["logits"].argmax(1).tolist() == [0, 1, 2]


def test_the_official_code_options():
    raw = _method(prototype="raw")
    _learn(raw, T0, FEATS)
    assert torch.allclose(raw.prototypes[0].double(), FEATS[0].double().mean(0).sqrt(), atol=1e-6)  # (mean x)^0.5
    twice = _method(shrink=2, correlation=False)
    _learn(twice, T0, FEATS)
    cov = torch.from_numpy(np.cov(FEATS[1].double().sqrt().numpy().T))
    expected = torch.linalg.pinv(shrink(shrink(cov, 1.0, 1.0), 1.0, 1.0))
    assert torch.allclose(twice.precisions[1].double(), expected, rtol=1e-4, atol=1e-4)
    plain = _method(tukey=False, shrink=0, correlation=False, normalize=False)
    _learn(plain, T0, FEATS)
    assert torch.allclose(plain.prototypes[0], FEATS[0].mean(0))
    identity = _method(covariance="identity")
    _learn(identity, T0, FEATS)
    assert identity.precisions.shape == (1, 2, 2) and torch.equal(identity.precisions[0], torch.eye(2))
    diagonal = _method(covariance="diagonal")
    _learn(diagonal, T0, FEATS)
    d = shrink(torch.from_numpy(np.cov(FEATS[0].double().sqrt().numpy().T)), 1.0, 1.0).diagonal()
    assert torch.allclose(diagonal.precisions[0].double(), torch.diag(d.norm() / d), rtol=1e-5)


def test_common_covariance_is_the_class_weighted_running_mean():
    m = _method(covariance="common", shrink=0, correlation=False)
    _learn(m, T0, FEATS)
    z01 = torch.cat([FEATS[0], FEATS[1]]).double().sqrt()
    first = torch.from_numpy(np.cov(z01.numpy().T))
    assert torch.allclose(m.common.double(), first, atol=1e-5) and m.precisions.shape == (1, 2, 2)
    _learn(m, T1, FEATS)
    second = torch.from_numpy(np.cov(FEATS[2].double().sqrt().numpy().T))
    mixed = (2 / 3) * first + (1 / 3) * second  # n_old / n_seen and n_new / n_seen
    assert torch.allclose(m.common.double(), mixed, atol=1e-5)
    assert torch.allclose(m.precisions[0].double(), torch.linalg.pinv(mixed), rtol=1e-4, atol=1e-4)


def test_first_task_head_option_and_the_cosine_head():
    m = _method(first_task="head", head="cosine")
    assert isinstance(m.net.head, CosineLinear) and m.net.head.sigma.item() == 1.0
    _learn(m, T0, FEATS)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(m.inference(x)["logits"], m.net(x)["logits"])  # the trained head on the first task
    _learn(m, T1, FEATS)
    assert torch.allclose(m.inference(x)["logits"], -m.distances(m.net(x)["features"]))


def test_negative_features_are_refused_by_the_tukey_transform():
    m = _method()
    with pytest.raises(ValueError, match="non-negative"):
        _learn(m, T0, {0: -FEATS[0], 1: FEATS[1]})
    _learn(_method(tukey=False), T0, {0: -FEATS[0], 1: FEATS[1]})


def test_later_tasks_train_no_epoch():
    m = _method()
    assert m.stage(T0).epochs == 7 and m.stage(T1).epochs == 0
    assert m.stage(T1).lr == 0.1  # only the epochs change


def test_state_is_tensors_that_load_with_weights_only():
    m = _method(covariance="common")
    _learn(m, T0, FEATS)
    _learn(m, T1, FEATS)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _method(covariance="common")
    fresh.load_state_dict(state)
    for key in ("prototypes", "precisions", "common"):
        assert torch.equal(getattr(fresh, key), getattr(m, key))
    f = torch.rand(5, 2) * 16
    assert torch.equal(fresh.distances(f), m.distances(f))


def test_a_memory_budget_is_refused():
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "fecam", "memory": {"size": 100}}])
    assert e.value.field == "memory.size"
    with pytest.raises(ConfigError) as e:
        cilkit.resolve([{"method": "fecam", "method_args": {"beta": 0}}])
    assert e.value.field == "method_args.beta"





def test_protocol_presets_drop_the_protocol_memory():
    for protocol in ("digits", "fmnist", "tin32-cpu"):
        layer = load_yaml(f"protocols/{protocol}/fecam")
        assert layer["method"] == "fecam" and layer["memory"]["size"] is None and "method_args" not in layer
    cfg = cilkit.resolve([load_yaml("protocols/digits/fecam")])
    assert cfg.method == "fecam" and cfg.memory.size is None and cfg.memory.per_class is None

# -- runs ------------------------------------------------------------------------------------------------


def test_the_backbone_is_frozen_after_the_first_task():
    driver = tiny_driver("fecam", scenario={"name": "B4-Inc3"})
    tasks = driver.scenario.tasks
    driver.run_task(tasks[0])
    after_first = {k: v.clone() for k, v in driver.net.backbone.state_dict().items()}
    record = driver.run_task(tasks[1])
    assert record["train_images"] == 0
    assert all(torch.equal(v, driver.net.backbone.state_dict()[k]) for k, v in after_first.items())
    assert driver.method.prototypes.shape[0] == 7 and record["cnn"]["top1"] > 50


def test_resumed_run_equals_the_uninterrupted_run(run_cut_and_resumed):
    full, partial, resumed = run_cut_and_resumed(tiny_cfg("fecam", scenario={"name": "B4-Inc3"}), cut_at=1)
    assert len(partial["tasks"]) == 1 and len(resumed["tasks"]) == len(full["tasks"]) == 3
    for a, b in zip(resumed["tasks"], full["tasks"]):
        assert a["cnn"] == b["cnn"]


def test_smoke_run(tmp_path):
    metrics, exp = smoke_run(tmp_path, "fecam")
    assert_complete_run(metrics, nme=False)
    assert exp.driver.memory is None and metrics["tasks"][1]["train_images"] == 0
