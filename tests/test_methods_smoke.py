"""Every registered method runs two tasks end to end and clears a floor that a broken method cannot."""

import pytest
from tiny import assert_complete_run, smoke_run

from cilkit.methods import METHODS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_smoke_run_clears_the_floor(method, tmp_path):
    metrics, exp = smoke_run(tmp_path, method)
    assert_complete_run(metrics, nme=METHODS[method].memory_use == "required")
    assert (tmp_path / f"smoke-{method}" / "metrics.json").is_file()


def test_the_floor_fails_a_run_at_chance():
    chance = {"complete": True, "summary": {"last_accuracy": 10.0},
              "tasks": [{"cnn": {"top1": 20.0}}, {"cnn": {"top1": 10.0}}]}
    with pytest.raises(AssertionError, match="first task"):
        assert_complete_run(chance)
