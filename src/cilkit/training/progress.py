"""Progress of training: tqdm bars on a terminal, one plain line per epoch otherwise."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("cilkit")


class Progress:
    def __init__(self, mode: str = "auto"):
        self.bars = mode == "bars" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "off"
        self._outer = None
        self._inner = None
        self._desc = ""

    def start_stage(self, desc: str, epochs: int) -> None:
        self._desc = desc
        if self.bars:
            self._outer = tqdm(total=epochs, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bars:
            self._inner = tqdm(total=steps, desc=f"epoch {epoch + 1}", unit="batch", leave=False, dynamic_ncols=True)

    def step(self) -> None:
        if self._inner is not None:
            self._inner.update()

    def end_epoch(self, epoch: int, epochs: int, loss: float, lr: float, images_per_s: float) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        if self._outer is not None:
            self._outer.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
            self._outer.update()
        elif not self.quiet:
            log.info(
                "%s epoch %d/%d loss %.4f lr %.4g (%.0f img/s)", self._desc, epoch + 1, epochs, loss, lr, images_per_s
            )

    def end_stage(self) -> None:
        if self._outer is not None:
            self._outer.close()
            self._outer = None
