"""Run folders: the resolved config, metrics, log, plot and a checkpoint after every task.

Every file is written atomically (to a temporary file in the same folder, then renamed), so a run
interrupted at any moment leaves the last complete version of each file and never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

import torch
import yaml

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class RunDir:
    """``runs/<name>/``: config.yaml, metrics.json, log.txt, accuracy.png, checkpoints/task_XXX.pt."""

    CHECKPOINT_RE = re.compile(r"task_(\d+)\.pt$")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        return self.config_path.exists()

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_text(self.metrics_path, json.dumps(metrics, indent=2))

    def read_metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())

    def save_checkpoint(self, task: int, state: dict) -> Path:
        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.checkpoint_dir / f"task_{task:03d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        return path

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := self.CHECKPOINT_RE.search(p.name))]
        return max(found)[1] if found else None

    def load_checkpoint(self, path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)
