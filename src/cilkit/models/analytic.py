"""Analytic (closed-form) classifiers: a fixed random buffer layer and ridge regression solved by
recursive least squares, the shared part of ACIL and DS-AL (:mod:`cilkit.methods.analytic`).

:class:`RecursiveLeastSquares` holds the ridge solution over every row it has been given,

    W = (X^T X + gamma I)^{-1} X^T Y,        R = (X^T X + gamma I)^{-1}

and takes new rows block by block with the Woodbury identity (ACIL, Eq. 9-10; DS-AL, Eq. 11-12):

    R' = R - R X_k^T (I + X_k R X_k^T)^{-1} X_k R
    W' = [W, 0] + R' X_k^T (Y_k - X_k [W, 0])

so that, with exact arithmetic, the weights after any sequence of blocks equal the joint solution on all
of them at once ("absolute memorization"). New classes are new zero columns of W (:meth:`add_classes`);
a block's one-hot targets have a column for every class known so far. Everything is kept and computed
in float64, as the official code does (``dtype=torch.double`` in ``ACIL``/``DSAL``): R is the inverse
of a matrix whose entries grow with the data seen, and float32 loses the equality within a few tasks.

:class:`RandomBuffer` is the feature expansion ``f -> f W_fe`` with a fixed random ``W_fe`` drawn from
a seeded generator (the activation is applied by the caller: DS-AL activates one projection twice).
Both are modules with buffers (no parameters): they live on the network, move with it and are saved
with its ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BUFFER_INITS = ("normal", "uniform")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "none": _identity,
}


class RandomBuffer(nn.Module):
    """The buffer layer: ``x -> x @ weight``, ``weight`` (in_features x width) fixed, float64.

    ``init``: ``normal``, every element N(0, 1) (ACIL §3.1: "drawing every element from a normal
    distribution"); ``uniform``, U(-1/sqrt(in_features), 1/sqrt(in_features)), the default initialisation
    of the ``torch.nn.Linear`` the official ``RandomBuffer`` subclasses (``kaiming_uniform_(a=sqrt(5))``).
    Drawn on the CPU from a generator seeded with ``seed``, so it depends on the seed only.
    """

    def __init__(self, in_features: int, width: int, *, init: str = "normal", seed: int = 0):
        super().__init__()
        if init not in BUFFER_INITS:
            raise ValueError(f"buffer init '{init}' is not one of {', '.join(BUFFER_INITS)}")
        g = torch.Generator().manual_seed(seed)
        if init == "normal":
            w = torch.randn(in_features, width, generator=g, dtype=torch.float64)
        else:
            bound = 1.0 / math.sqrt(in_features)
            w = (torch.rand(in_features, width, generator=g, dtype=torch.float64) * 2 - 1) * bound
        self.register_buffer("weight", w)

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight


class RecursiveLeastSquares(nn.Module):
    """Ridge regression on ``dim`` inputs, updated recursively: buffers ``weight`` (dim x classes) and
    ``R`` (dim x dim, the regularised inverse autocorrelation), both float64. ``R`` starts at I / gamma
    and ``weight`` with no column, which is the state before any data (the first block's update gives
    the closed form (X^T X + gamma I)^{-1} X^T Y of ACIL's Eq. 4)."""

    def __init__(self, dim: int, gamma: float):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = gamma
        self.register_buffer("weight", torch.zeros(dim, 0, dtype=torch.float64))
        self.register_buffer("R", torch.eye(dim, dtype=torch.float64) / gamma)

    @property
    def n_classes(self) -> int:
        return self.weight.shape[1]

    def add_classes(self, n: int) -> None:
        """``n`` new zero columns (structure only: the driver replays it on resume, before loading)."""
        self.weight = torch.cat([self.weight, self.weight.new_zeros(self.weight.shape[0], n)], dim=1)

    @torch.no_grad()
    def update(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Take the rows ``X`` (n x dim) with targets ``Y`` (n x classes) in one Woodbury step."""
        X = X.to(self.R.dtype)
        Y = Y.to(self.R.dtype)
        if Y.shape[1] != self.n_classes:
            raise ValueError(f"targets have {Y.shape[1]} columns, the classifier {self.n_classes}")
        RXt = self.R @ X.T  # dim x n
        K = torch.eye(X.shape[0], dtype=X.dtype, device=X.device) + X @ RXt  # n x n, symmetric positive definite
        self.R = self.R - RXt @ torch.linalg.solve(K, RXt.T)  # RXt^T = X R (R is symmetric)
        self.weight = self.weight + self.R @ (X.T @ (Y - X @ self.weight))

    def fit(self, X: torch.Tensor, Y: torch.Tensor, batch: int | None = None) -> None:
        """Take the rows of ``X`` in blocks of ``batch`` (all at once when None); the result does not depend
        on the blocks, up to rounding."""
        for rows in row_blocks(len(X), batch):
            self.update(X[rows], Y[rows])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.to(self.weight.dtype) @ self.weight


def row_blocks(n: int, batch: int | None) -> list[slice]:
    """Consecutive slices of ``batch`` rows covering ``range(n)`` (one slice when ``batch`` is None)."""
    step = n if batch is None else max(1, batch)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] if n else []


def ridge_solution(X: torch.Tensor, Y: torch.Tensor, gamma: float) -> torch.Tensor:
    """The joint least-squares solution (X^T X + gamma I)^{-1} X^T Y in float64 (the reference the
    recursion must equal; ACIL Eq. 7)."""
    X, Y = X.double(), Y.double()
    A = X.T @ X + gamma * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(A, X.T @ Y)
