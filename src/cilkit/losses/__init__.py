"""Losses shared by several methods, each checked on hand-made tensors in the tests."""

from cilkit.losses.ce import masked_ce
from cilkit.losses.distillation import embedding_distillation, kd_loss

__all__ = ["embedding_distillation", "kd_loss", "masked_ce"]
