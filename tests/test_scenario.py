import numpy as np
import pytest

from cilkit.data.datasets import Dataset, ImageSet
from cilkit.data.scenario import class_order, make_scenario, parse_increments
from cilkit.errors import ConfigError


def _toy(n_classes=10, per_class=3):
    labels = np.repeat(np.arange(n_classes), per_class)
    images = np.zeros((len(labels), 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = labels  # the original label is written into the image
    split = ImageSet(images, labels)
    return Dataset("toy", split, ImageSet(images.copy(), labels.copy()), [f"c{i}" for i in range(n_classes)], (0.5,), (0.5,))


def test_seed_order_is_numpy_permutation_with_seed_1993():
    np.random.seed(1993)
    expected = np.random.permutation(100).tolist()
    assert class_order(100) == expected
    # the CIFAR-100 order of iCaRL / UCIR / PyCIL starts like this
    assert expected[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def test_identity_and_explicit_orders():
    assert class_order(5, "identity") == [0, 1, 2, 3, 4]
    assert class_order(3, [2, 0, 1]) == [2, 0, 1]
    with pytest.raises(ConfigError, match="scenario.class_order"):
        class_order(3, [0, 0, 1])


def test_b0_b50_and_uneven_last_task():
    assert parse_increments("B0-Inc10", 100) == [10] * 10
    assert parse_increments("B50-Inc10", 100) == [50] + [10] * 5
    assert parse_increments("B0-Inc3", 10) == [3, 3, 3, 1]
    assert parse_increments("B4-Inc4", 10) == [4, 4, 2]
    assert parse_increments("b50inc25", 100) == [50, 25, 25]
    assert parse_increments([4, 3, 3], 10) == [4, 3, 3]


@pytest.mark.parametrize("spec", ["B0-Inc0", "B10-Inc2", "foo", [3, 3], [5, 5, 0]])
def test_scenarios_that_do_not_add_up(spec):
    with pytest.raises(ConfigError, match="scenario.name"):
        parse_increments(spec, 10)


def test_labels_are_remapped_to_arrival_order():
    ds = _toy()
    sc = make_scenario(ds, "B0-Inc5", order="seed")
    np.random.seed(1993)
    order = np.random.permutation(10).tolist()
    assert sc.order == order
    # new label k holds the images of original class order[k]
    assert np.array_equal(sc.dataset.train.images[:, 0, 0, 0], np.array(order)[sc.dataset.train.labels])
    assert [(t.start, t.stop) for t in sc.tasks] == [(0, 5), (5, 10)]
    assert sc.boundaries == [0, 5, 10]
    assert sc.dataset.class_names[0] == f"c{order[0]}"


def test_subset_keeps_first_classes_of_the_order():
    ds = _toy()
    sc = make_scenario(ds, "B0-Inc2", order="seed", n_classes=4)
    np.random.seed(1993)
    kept = np.random.permutation(10)[:4]
    assert sc.n_classes == 4 and len(sc.tasks) == 2
    assert sorted(np.unique(sc.dataset.train.images[:, 0, 0, 0]).tolist()) == sorted(kept.tolist())
    assert len(sc.dataset.test) == 4 * 3


def _same_state(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_seed_order_is_unchanged_and_leaves_the_global_rng_alone():
    # observed from the original np.random.seed(1993); np.random.permutation(n) code: iCaRL / PyCIL order
    first20 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]
    np.random.seed(123)
    before = np.random.get_state()
    order = class_order(100)
    assert order[:20] == first20 and order[-5:] == [67, 29, 49, 57, 33] and sorted(order) == list(range(100))
    assert _same_state(np.random.get_state(), before)
    sc = make_scenario(_toy(), "B0-Inc5", order="seed")
    assert sc.order == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    assert _same_state(np.random.get_state(), before)
