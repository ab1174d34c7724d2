"""The memory cost of a class-incremental learner in bytes: its model and its exemplars together.

Zhou et al. (MEMO, ICLR 2023) count both in one budget: a parameter is a 32-bit float (4 bytes) and an
exemplar an image of uint8 values (C·H·W bytes; 3072 for CIFAR). A ResNet-32's 463,504 parameters then
cost 1,854,016 bytes, the price of 603 CIFAR images (the title's "a model or 603 exemplars"). The
official code (``utils/model2exemplar.py``) counts the backbone's parameters only (no classifier) and
prints megabytes as bytes / 2^20.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FLOAT_BYTES = 4  # a float32 parameter
MB = 1024 * 1024  # the official code's megabyte


def image_bytes(shape: Sequence[int]) -> int:
    """Bytes of one stored exemplar: one uint8 value per channel and pixel."""
    return math.prod(int(s) for s in shape)


def memory_cost(model_params: int, exemplars: int, image_shape: Sequence[int]) -> dict:
    """Bytes of the model (float32 parameters), of the exemplars (uint8 images) and of both, and the
    model's cost counted in exemplars."""
    per_image = image_bytes(image_shape)
    model = FLOAT_BYTES * model_params
    stored = exemplars * per_image
    return {"model_bytes": model, "exemplar_bytes": stored, "total_bytes": model + stored,
            "total_mb": (model + stored) / MB, "model_in_exemplars": model / per_image}


def exemplars_for(params_saved: int, image_shape: Sequence[int]) -> int:
    """Exemplars that ``params_saved`` parameters pay for (floored): the official code's aligned budget,
    e.g. MEMO's extra exemplars over DER's, (DER's parameters - MEMO's) · 4 / (C·H·W)."""
    return (FLOAT_BYTES * params_saved) // image_bytes(image_shape)
