"""The importance-weighted quadratic penalty of EWC, SI and MAS, and the per-sample gradients their
importances are made of.

    penalty(theta) = sum_i Omega_i * (theta_i - theta*_i)^2

``theta*`` (an *anchor*) and ``Omega`` (an *importance*) are dicts from parameter name to tensor, taken
at the end of an earlier task. A parameter that did not exist then (a head block added by a later
``grow``) has no anchor and no penalty. A parameter that grew in place since (more rows, the same
name) is penalised on its leading block only, the part the anchor knew (:func:`overlap`); the new
rows are free. The weight in front of the sum (EWC's lambda/2, SI's c, MAS's lambda) is the caller's.

:func:`per_sample_sums` gives sum_k r(d f(theta; x_k) / d theta) with the gradient of each sample taken
on its own (``torch.func``: ``vmap`` over ``grad``), not the gradient of a batch mean: EWC's Fisher is
the mean of squared per-sample gradients and MAS's importance the mean of their magnitudes, and the
square (or magnitude) of a batch's mean gradient is a different, smaller quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.func import grad, vmap

Params = dict[str, torch.Tensor]


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> Params:
    """Detached float32 copies of ``named`` (e.g. ``module.named_parameters()``): an anchor."""
    return {n: p.detach().float().clone() for n, p in named}


def leading(shape: torch.Size | tuple[int, ...]) -> tuple[slice, ...]:
    """The index of the leading block of ``shape`` in a tensor at least as large in every dimension."""
    return tuple(slice(0, s) for s in shape)


def overlap(p: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The part of ``p`` that a tensor of ``shape`` taken earlier knew: ``p`` itself, or its leading block
    when ``p`` has grown since (new rows of a classifier). A tensor that shrank or changed rank is an error."""
    if p.shape == shape:
        return p
    if p.dim() != len(shape) or any(a < b for a, b in zip(p.shape, shape)):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} cannot hold its anchor of shape {tuple(shape)}")
    return p[leading(shape)]


def quadratic_penalty(params: Mapping[str, torch.Tensor], anchor: Params, importance: Params) -> torch.Tensor:
    """sum_i Omega_i (theta_i - theta*_i)^2 over the parameters that have an importance (see the module)."""
    total = None
    for name, omega in importance.items():
        p = params.get(name)
        if p is None:
            raise KeyError(f"parameter {name!r} has an importance but no longer exists in the network")
        diff = overlap(p, omega.shape).float() - anchor[name]
        term = (omega * diff * diff).sum()
        total = term if total is None else total + term
    if total is None:
        device = next(iter(params.values())).device if params else None
        return torch.zeros((), device=device)
    return total


@torch.no_grad()
def penalty_gradient(params: Mapping[str, torch.Tensor], anchor: Params, importance: Params) -> Params:
    """d/d theta of :func:`quadratic_penalty`: 2 Omega (theta - theta*) on each parameter's anchored block,
    zero on rows created since; only the parameters that have an importance are in the result."""
    out = {}
    for name, omega in importance.items():
        p = params[name]
        g = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        g[leading(omega.shape)] = 2.0 * omega * (overlap(p, omega.shape).float() - anchor[name])
        out[name] = g
    return out


@torch.no_grad()
def accumulate(total: Params | None, new: Params, decay: float = 1.0) -> Params:
    """``decay * total + new`` name by name; a name in one only keeps its (decayed) value, and an old
    tensor smaller than its new one (a grown parameter) is added to the new one's leading block."""
    out = {n: v.detach().clone() for n, v in new.items()}
    for name, old in (total or {}).items():
        if name not in out:
            out[name] = decay * old
        else:
            overlap(out[name], old.shape).add_(decay * old)
    return out


def per_sample_sums(fn: Callable[..., torch.Tensor], params: Params, inputs: tuple[torch.Tensor, ...],
                    reduce: Callable[[torch.Tensor], torch.Tensor], chunk: int = 32) -> Params:
    """sum_k reduce(d fn(params, *sample_k) / d params) over the samples of ``inputs`` (tensors with the
    samples along dimension 0), each sample's gradient on its own.

    ``fn(params, *sample)`` is a scalar function of one sample (no batch dimension), e.g. a
    ``torch.func.functional_call`` of a network in eval mode; ``reduce`` is applied elementwise
    (``torch.square`` for a Fisher, ``torch.abs`` for MAS). ``chunk`` samples are differentiated at a
    time (memory: ``chunk`` gradients of the whole network); the result does not depend on it.
    """
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    per_sample = vmap(grad(fn), in_dims=(None, *([0] * len(inputs))))
    n = len(inputs[0])
    for start in range(0, n, chunk):
        grads = per_sample(params, *(t[start : start + chunk] for t in inputs))
        for name, g in grads.items():
            sums[name] += reduce(g.float()).sum(0)
    return sums
