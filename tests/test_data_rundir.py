"""metrics.json is strict JSON: NaN and infinities become null, with one warning naming the keys."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from cilkit.results.rundir import RunDir, json_safe


def strict_load(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_safe_replaces_nan_and_infinities_recursively():
    nulled = []
    got = json_safe({"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf, "d": (2, np.float32("nan"))}],
                     "e": "NaN", "f": np.float64(0.25), 3: None}, nulled)
    assert got == {"a": None, "b": [1.5, None, {"c": None, "d": [2, None]}], "e": "NaN", "f": 0.25, 3: None}
    assert nulled == ["a", "b[1]", "b[2].c", "b[2].d[1]"]
    assert json_safe(math.nan) is None and json_safe([1, 2]) == [1, 2]


def test_metrics_json_is_strict_json_and_the_warning_comes_once(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    metrics = {"accuracy": [0.9, 0.8], "per_class": [[1.0, math.nan], [0.5, 0.5]], "forgetting": math.nan}
    with caplog.at_level(logging.WARNING, logger="cilkit"):
        run.write_metrics(metrics)
        run.write_metrics(metrics)  # after the next task: the same keys, no second warning
    text = run.metrics_path.read_text()
    assert "NaN" not in text
    assert strict_load(text) == {"accuracy": [0.9, 0.8], "per_class": [[1.0, None], [0.5, 0.5]], "forgetting": None}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "cilkit"]
    assert len(warnings) == 1
    assert "per_class[0][1]" in warnings[0] and "forgetting" in warnings[0] and "null" in warnings[0]
    assert run.read_metrics()["forgetting"] is None


def test_metrics_without_nan_write_as_before(tmp_path, caplog):
    run = RunDir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cilkit"):
        run.write_metrics({"a": [1, 2.5], "b": {"c": "x"}})
    assert json.loads(run.metrics_path.read_text()) == {"a": [1, 2.5], "b": {"c": "x"}}
    assert run.metrics_path.read_text() == json.dumps({"a": [1, 2.5], "b": {"c": "x"}}, indent=2)
    assert not caplog.records


def test_unserialisable_values_still_fail_loudly(tmp_path):
    with pytest.raises(TypeError):
        RunDir(tmp_path).write_metrics({"a": object()})
