"""Run folders: the resolved config, metrics, log, plot and a checkpoint after every task.

Every file is written atomically (to a temporary file in the same folder, then renamed), so a run
interrupted at any moment leaves the last complete version of each file and never a torn one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

from cilkit.errors import CilkitError

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


def json_safe(obj, nulled: list[str] | None = None, _where: str = ""):
    """``obj`` with every NaN and infinity replaced by None, recursively in dicts, lists and tuples.

    JSON has no NaN or Infinity (``json.dumps`` writes a bare ``NaN``, which strict readers reject).
    The key path of every value set to null (``acc_per_task[2].old``) is appended to ``nulled``.
    """
    if isinstance(obj, dict):
        return {k: json_safe(v, nulled, f"{_where}.{k}" if _where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, nulled, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, float) or (getattr(obj, "ndim", None) == 0 and getattr(getattr(obj, "dtype", None), "kind", "") == "f"):
        value = float(obj)  # numpy float scalars too
        if math.isfinite(value):
            return value
        if nulled is not None:
            nulled.append(_where or "<top level>")
        return None
    return obj


_json_log = logging.getLogger("cilkit")
MIN_FREE_BYTES = 64 * 2**20  # refused below this before any data is read (a checkpoint of ResNet-32 is ~2 MiB)


class RunFolderError(CilkitError):
    """The run folder cannot be created, written or read as a run."""


class CheckpointError(RunFolderError):
    """A checkpoint cannot be read as a cilkit checkpoint."""


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

    def check_writable(self) -> None:
        """Refuse, before any data is read, a run folder that cannot be created or written.

        The folders it had to create for the check are removed again: nothing is left behind.
        """
        made, node = [], self.path
        while not node.exists():
            made.append(node)
            node = node.parent
        if not node.is_dir():
            raise RunFolderError(f"cannot create the run folder {self.path}: {node} is a file, not a folder")
        try:
            for folder in reversed(made):
                folder.mkdir()
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(self.path).free
            if free < MIN_FREE_BYTES:
                raise RunFolderError(f"only {free / 2**20:.0f} MiB free on the disk of {self.path}; a run folder needs at least "
                                     f"{MIN_FREE_BYTES / 2**20:.0f} MiB (checkpoints, metrics); free space or choose another --run-dir")
        except OSError as e:
            raise RunFolderError(f"cannot write the run folder {self.path}: {e.strerror or e}; choose another --run-dir") from None
        finally:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    pass

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text())

    def write_metrics(self, metrics: dict) -> None:
        nulled: list[str] = []
        safe = json_safe(metrics, nulled)
        reported = self.__dict__.setdefault("_nulled_reported", set())
        new = [k for k in nulled if k not in reported]
        if new:
            reported.update(new)
            shown = ", ".join(new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else "")
            _json_log.warning("%s: NaN or infinite values written as null (JSON has no NaN): %s; a NaN accuracy "
                              "means no test sample to measure it, e.g. a class without test data",
                              self.metrics_path, shown)
        atomic_write_text(self.metrics_path, json.dumps(safe, indent=2, allow_nan=False))

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

    def checkpoints(self) -> list[Path]:
        """The checkpoints of the run, newest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := self.CHECKPOINT_RE.search(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def load_checkpoint(self, path: Path) -> dict:
        """A checkpoint, loaded as data only (``weights_only=True``: tensors and plain types, no code)."""
        try:
            with warnings.catch_warnings():  # random bytes make torch warn about the pickle protocol first
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint {path} holds objects that are not data (refused, nothing of it was run): "
                                  f"{str(e).splitlines()[0]}") from None
        except Exception as e:  # truncated, empty, random bytes: torch raises several kinds
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})") from None
        if not isinstance(state, dict) or "next_task" not in state:
            raise CheckpointError(f"checkpoint {path} is not a cilkit checkpoint (no task state)")
        return state

    # -- one process per run folder ---------------------------------------------------------------

    def lock(self) -> None:
        """Hold the run folder for this process (``.lock``); a second process on it is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until unlock()
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise RunFolderError(f"run folder {self.path} is in use by another cilkit process (pid {owner})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle
        self.remove_stale_temporaries()

    def unlock(self) -> None:
        handle = self.__dict__.pop("_lock", None)
        if handle is not None:
            handle.close()

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files an interrupted atomic write left (only safe while holding the lock)."""
        removed = []
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        if removed:
            _json_log.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), self.path)
        return removed
