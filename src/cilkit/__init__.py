"""cilkit: class-incremental learning methods that are faithful to their papers, fast and resumable."""

from __future__ import annotations

__version__ = "0.1.0"

from cilkit.config import Config
from cilkit.experiment import Experiment, resolve, run
from cilkit.extend import extend_run
from cilkit.trained import load

__all__ = ["Config", "Experiment", "__version__", "extend_run", "load", "resolve", "run"]
