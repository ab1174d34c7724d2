import math

import pytest
import torch

from cilkit.memory.exemplars import ExemplarMemory
from cilkit.memory.herding import herding
from cilkit.memory.nme import class_mean, nme_scores


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def _herding_by_definition(phi, m):
    """The iCaRL rule written as plainly as possible, one candidate at a time."""
    mu = phi.mean(0)
    chosen = []
    for k in range(1, m + 1):
        best, best_d = None, None
        for i in range(len(phi)):
            if i in chosen:
                continue
            s = sum((phi[j] for j in chosen), torch.zeros(2)) + phi[i]
            d = torch.linalg.norm(mu - s / k).item()
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_order_on_a_hand_made_example():
    # four unit vectors at 0, 10, -10 and 90 degrees; worked out by hand:
    # 10 deg is closest to the mean, then 0 deg; the third pick is 90 deg (it pulls the running mean
    # back toward mu's positive y), and -10 deg comes last.
    phi = torch.tensor([_unit(0), _unit(10), _unit(-10), _unit(90)])
    assert herding(phi, 4).tolist() == [1, 0, 3, 2]
    assert herding(phi, 2).tolist() == [1, 0]  # a prefix: shrinking keeps the first picks
    assert _herding_by_definition(phi, 4) == [1, 0, 3, 2]


def test_herding_matches_the_definition_on_random_features_and_normalises():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 2, generator=g) * torch.rand(30, 1, generator=g) * 5
    phi = torch.nn.functional.normalize(feats, dim=1)
    assert herding(feats, 10).tolist() == _herding_by_definition(phi, 10)
    order = herding(feats, 30)
    assert sorted(order.tolist()) == list(range(30))  # no repeats


def _grow(mem, classes, per_class=50):
    labels = torch.arange(100).repeat_interleave(per_class)
    feats = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1))
    mem.update(classes, lambda c: (labels == c).nonzero().flatten(), lambda idx: feats[idx])
    return labels


def test_fixed_total_budget_is_shared_equally_and_never_exceeded():
    mem = ExemplarMemory(total=100)
    labels = _grow(mem, range(4))
    assert {c: len(v) for c, v in mem.exemplars.items()} == {c: 25 for c in range(4)}
    first_class0 = mem.exemplars[0].clone()
    _grow(mem, range(4, 10))
    assert len(mem) <= 100
    assert {len(v) for v in mem.exemplars.values()} == {10}
    assert torch.equal(mem.exemplars[0], first_class0[:10])  # shrinking keeps the herding prefix
    for c, idx in mem.exemplars.items():
        assert (labels[idx] == c).all() and len(set(idx.tolist())) == len(idx)
    _grow(mem, range(10, 13))
    assert len(mem) == 13 * 7 <= 100


def test_fixed_per_class_and_random_selection():
    mem = ExemplarMemory(total=None, per_class=20, selection="random")
    _grow(mem, range(3))
    _grow(mem, range(3, 10))
    assert len(mem) == 200 and {len(v) for v in mem.exemplars.values()} == {20}
    with pytest.raises(ValueError):
        ExemplarMemory(total=10, per_class=2)


def test_memory_state_round_trip():
    mem = ExemplarMemory(total=60)
    _grow(mem, range(3))
    other = ExemplarMemory(total=60)
    other.exemplars[99] = torch.tensor([1])  # a stale class must not survive the load
    other.load_state_dict(mem.state_dict())
    assert other.exemplars.keys() == mem.exemplars.keys()
    assert all(torch.equal(other.exemplars[c], mem.exemplars[c]) for c in mem.exemplars)


def test_nme_class_means_and_prediction():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    m = class_mean(feats)
    assert torch.allclose(m, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    flipped = torch.tensor([[0.0, -1.0], [0.0, -1.0]])
    assert torch.allclose(class_mean(feats, flipped), torch.tensor([1.0, -1.0]) / math.sqrt(2))
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[5.0, 1.0], [0.1, 2.0], [-3.0, -0.5]])
    scores = nme_scores(x, means)
    assert scores.argmax(1).tolist() == [0, 1, 2]
    x0 = torch.nn.functional.normalize(x[:1], dim=1)
    assert torch.allclose(-scores[0, 0], ((x0 - means[0]) ** 2).sum())


def test_class_means_follow_the_memory_order_and_use_flips_when_asked():
    from cilkit.memory.nme import class_means

    mem = ExemplarMemory(total=6)
    mem.exemplars = {1: torch.tensor([2, 3]), 0: torch.tensor([0, 1])}
    table = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])

    def features(idx, flip=False):
        return -table[idx] if flip else table[idx]

    plain = class_means(mem, features, flip=False)
    assert torch.allclose(plain, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # class 0 first, unit rows
    flipped = class_means(mem, features, flip=True)
    assert torch.allclose(flipped, torch.zeros(2, 2))  # a feature and its negation cancel
