"""The tiny run the method tests share: embedded digits, a one-layer MLP, 2 epochs a task, memory 60."""

from __future__ import annotations

import cilkit
from cilkit.config import Config

TINY = {"model": {"backbone": "mlp", "hidden": [64]}, "train": {"epochs": 2}, "memory": {"size": 60}}
SMALL_CONVNET = {"backbone": "convnet", "widths": [8, 16]}  # has BatchNorm, for tests on its statistics


def tiny_cfg(method: str, method_args: dict | None = None, **sections) -> Config:
    """The tiny config for ``method``; ``sections`` replace whole top-level sections (``model=SMALL_CONVNET``)."""
    return cilkit.resolve([{**TINY, "method": method, "method_args": method_args or {}, **sections}])
