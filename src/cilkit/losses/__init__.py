"""Losses shared by several methods, each checked on hand-made tensors in the tests."""

from cilkit.losses.ce import masked_ce
from cilkit.losses.distillation import balanced_kd, effective_number_weights, embedding_distillation, kd_loss

__all__ = ["balanced_kd", "effective_number_weights", "embedding_distillation", "kd_loss", "masked_ce"]
