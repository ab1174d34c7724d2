"""Weights of a model trained outside cilkit (``model.init: PATH``): a backbone, and optionally its linear
classifier, read from a PyTorch ``state_dict`` with ``weights_only=True`` (tensors only; nothing in the
file is run).

The file may hold, possibly wrapped as ``{"state_dict": ...}`` (or ``"model"``) and with DataParallel's
``module.`` prefix:

- the backbone's own keys (``torch.save(net.backbone.state_dict(), path)``), or cilkit's whole network
  (``backbone.*`` and ``head.*``: ``torch.save(net.state_dict(), path)``);
- beside them, a linear classifier ``(K, D)`` (+ bias ``(K,)``) under ``fc``, ``head``, ``classifier`` or
  ``linear`` (``head.blocks.<i>``, cilkit's per-task blocks, are joined in order).

Every backbone key must be there with its shape (BatchNorm's ``num_batches_tracked`` may be missing); a
key that is neither the backbone's nor a classifier's is refused, so a file of another architecture
gives one error naming ``model.init`` and the keys that do not fit.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cilkit.errors import ConfigError
from cilkit.models.heads import FixedLinear, IncrementalLinear

HEAD_PREFIXES = ("fc", "head", "classifier", "linear")
_BLOCK_RE = re.compile(r"^head\.blocks\.(\d+)\.(weight|bias)$")
FIELD = "model.init"


def _listed(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class InitWeights:
    """A backbone's state and, if the file held one, a linear classifier (``head_weight`` (K, D), ``head_bias`` (K,))."""

    path: str
    backbone: dict[str, torch.Tensor]
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None

    @property
    def n_head(self) -> int:
        return 0 if self.head_weight is None else int(self.head_weight.shape[0])

    def load_backbone(self, backbone: nn.Module) -> None:
        backbone.load_state_dict(self.backbone, strict=False)  # only num_batches_tracked may be absent (read_init)

    @torch.no_grad()
    def load_head(self, net: nn.Module) -> None:
        """The classifier's rows into the first task's rows of ``net.head`` (a linear head grown for it)."""
        head = net.head
        linear = head.blocks[0] if isinstance(head, IncrementalLinear) else head
        k = self.n_head
        linear.weight[:k].copy_(self.head_weight.to(linear.weight))
        if linear.bias is not None:
            linear.bias[:k].copy_(self.head_bias.to(linear.bias) if self.head_bias is not None else torch.zeros(k))


def head_takes_rows(net: nn.Module) -> bool:
    """Whether the network's head is a plain linear classifier (growing blocks or fixed rows) that a file's can fill."""
    return isinstance(net.head, (IncrementalLinear, FixedLinear))


def _tensors(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and len(obj) >= 1:
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    tensors = isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    if not tensors or not obj:
        raise ConfigError(FIELD, f"{path} is not a state_dict (a mapping of parameter names to tensors; save one with "
                          "torch.save(model.state_dict(), path))")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_init(path: str | Path, backbone: nn.Module) -> InitWeights:
    """The weights of ``path`` for ``backbone``, checked (module docstring); ConfigError naming model.init otherwise."""
    path = Path(path).expanduser()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise ConfigError(FIELD, f"{path} cannot be read as a PyTorch state_dict (not a torch.save file, or "
                              "truncated)") from None
        raise ConfigError(FIELD, f"{path} holds objects that are not tensors ({found.group(1)}; refused, nothing of it "
                          "was run): give a plain state_dict") from None
    except Exception as e:  # noqa: BLE001 - truncated or random bytes make torch raise several kinds
        raise ConfigError(FIELD, f"{path} cannot be read as a PyTorch state_dict ({type(e).__name__})") from None
    state = _tensors(raw, path)
    expected = backbone.state_dict()
    if any(k.startswith("backbone.") for k in state):
        bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    else:
        bb = {k: v for k, v in state.items() if k in expected}
        rest = {k: v for k, v in state.items() if k not in expected}
    weight, bias, rest = _classifier(rest)
    unknown = set(rest) | (set(bb) - set(expected))
    missing = {k for k in expected if k not in bb and not k.endswith("num_batches_tracked")}
    wrong = {k for k in bb if k in expected and bb[k].shape != expected[k].shape}
    if unknown or missing or wrong:
        parts = []
        if missing:
            parts.append(f"the backbone's keys {_listed(missing)} are missing")
        if wrong:
            parts.append("shapes differ: " + ", ".join(f"{k} {tuple(bb[k].shape)} (the backbone's: {tuple(expected[k].shape)})"
                                                       for k in sorted(wrong)[:5]))
        if unknown:
            parts.append(f"keys that are neither the backbone's nor a linear classifier's: {_listed(unknown)}")
        raise ConfigError(FIELD, f"{path} does not fit the backbone {type(backbone).__name__} ({len(expected)} keys, e.g. "
                          f"{_listed(list(expected)[:3], 3)}): " + "; ".join(parts) +
                          "; give the state_dict of the same backbone (model.backbone and its widths)")
    dim = getattr(backbone, "out_dim", None)
    if weight is not None:
        bad_bias = bias is not None and bias.shape != weight.shape[:1]
        if weight.ndim != 2 or (dim is not None and weight.shape[1] != dim) or bad_bias:
            raise ConfigError(FIELD, f"{path}: the classifier's weight {tuple(weight.shape)} (bias "
                              f"{None if bias is None else tuple(bias.shape)}) is not a linear layer over the backbone's "
                              f"{dim} features")
    return InitWeights(str(path), {k: v for k, v in bb.items()}, weight, bias)


def _classifier(rest: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """The linear classifier among ``rest`` (weight, bias) and the keys left over."""
    blocks = {}
    for k, v in rest.items():
        m = _BLOCK_RE.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if blocks:
        left = {k: v for k, v in rest.items() if not _BLOCK_RE.match(k)}
        order = sorted(blocks)
        weight = torch.cat([blocks[i]["weight"] for i in order if "weight" in blocks[i]])
        biases = [blocks[i].get("bias") for i in order]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        return weight, bias, left
    for prefix in HEAD_PREFIXES:
        if f"{prefix}.weight" in rest:
            left = {k: v for k, v in rest.items() if k not in (f"{prefix}.weight", f"{prefix}.bias")}
            return rest[f"{prefix}.weight"], rest.get(f"{prefix}.bias"), left
    return None, None, rest
