"""Where training runs: the device, its image stores, batch transforms, mixed precision, features.

A :class:`Runtime` is built once per experiment from explicit settings (it knows no config and no
method). Methods reach it only through their context (:mod:`cilkit.training.context`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from cilkit.data.augment import BatchAugment
from cilkit.data.store import ImageStore
from cilkit.errors import ConfigError

Forward = Callable[[torch.Tensor], dict]  # a normalised batch -> {"features", ...}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable CUDA is a config error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "'cuda' was asked for but no CUDA device is available; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("device", "'mps' was asked for but no Apple MPS device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as plain data and tensors (a checkpoint loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": list(random.getstate()), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Runtime:
    """The training device with the train/test stores, the batch augmentation and the precision settings."""

    def __init__(
        self,
        device: torch.device,
        train_data: ImageStore,
        test_data: ImageStore,
        augment: BatchAugment,
        amp: bool = False,
        channels_last: bool = False,
        eval_batch_size: int = 1024,
    ):
        self.device = device
        self.train_data = train_data
        self.test_data = test_data
        self.augment = augment
        self.amp = amp
        self.channels_last = channels_last
        self.eval_batch_size = eval_batch_size

    def autocast(self):
        """bf16 autocast on the device when ``amp`` is on (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-d batch in channels_last when that is on; anything else unchanged."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move ``module`` to the device (and to channels_last when that is on)."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def train_batch(self, idx: torch.Tensor, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: uint8 images drawn from the store, transformed as a whole on the device."""
        x, y = self.train_data.batch(idx)
        return self.to_memory_format(self.augment.train(x) if augment else self.augment.test(x)), y

    def test_batches(self, store: ImageStore, indices: torch.Tensor):
        """(normalised batch, labels) of ``indices`` of ``store``, in evaluation-sized batches."""
        for x, y in store.iter_batches(indices, self.eval_batch_size):
            yield self.to_memory_format(self.augment.test(x)), y

    @torch.no_grad()
    def features(
        self,
        indices: torch.Tensor,
        forward: Forward,
        flip: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``forward(x)["features"]`` of the training samples ``indices`` under test-time transforms.

        ``flip`` mirrors the images; ``transform`` (e.g. a rotation) is applied to the normalised batch.
        The caller sets the modules' mode (:func:`cilkit.models.network.eval_mode`).
        """
        out = []
        for x, _ in self.train_data.iter_batches(indices, self.eval_batch_size):
            x = self.augment.test(x)
            if flip:
                x = x.flip(3)
            if transform is not None:
                x = transform(x).contiguous()
            with self.autocast():
                out.append(forward(self.to_memory_format(x))["features"].float())
        return torch.cat(out) if out else torch.empty(0, 0, device=self.device)
