"""Typed dict -> dataclass conversion, shared by the config sections and the methods' hyperparameters.

A dataclass field's annotation says what a value may be (``int``, ``float``, ``bool | None``,
``Literal["a", "b"]``, ``list[int]``, a nested dataclass); :func:`from_dict` checks every key and
value of a mapping against it and raises :class:`ConfigError` naming the dotted key. Ranges are
declared beside the default with :func:`param` (``T: float = param(2.0, gt=0)``). This module is
the bottom layer: it imports nothing of cilkit but the errors.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from typing import Any

from cilkit.errors import ConfigError

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

_BOUNDS = {"gt": (lambda v, b: v > b, "> {}"), "ge": (lambda v, b: v >= b, ">= {}"),
           "lt": (lambda v, b: v < b, "< {}"), "le": (lambda v, b: v <= b, "<= {}")}
AUTO = "auto"  # a ``bool | None`` field also takes the word auto for None (decided at run time)


def param(default: Any = dataclasses.MISSING, *, gt=None, ge=None, lt=None, le=None, default_factory=dataclasses.MISSING):
    """A dataclass field with a range: ``T: float = param(2.0, gt=0)``, ``k: int = param(2, ge=1)``.

    The bounds apply to a number, to each item of a list, and are skipped for None.
    """
    bounds = {k: v for k, v in {"gt": gt, "ge": ge, "lt": lt, "le": le}.items() if v is not None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_optional_bool(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {bool, type(None)}


def check_value(path: str, value: Any, tp: Any) -> Any:
    """``value`` coerced to ``tp`` or a ConfigError naming ``path``."""
    if _is_optional_bool(tp):
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (AUTO, "true", "false"):
            return {AUTO: None, "true": True, "false": False}[value.lower()]
        raise ConfigError(path, f"expected true, false or auto, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return check_value(path, value, option)
            except ConfigError:
                pass
        allowed = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(path, f"expected {allowed}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(path, f"{value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(path, f"expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp}")


def check_bounds(path: str, value: Any, bounds: dict) -> None:
    """Raise ConfigError when a number (or a list's item) is outside ``bounds`` (see :func:`param`)."""
    if not bounds or value is None:
        return
    for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
        for name, bound in bounds.items():
            ok, text = _BOUNDS[name]
            if isinstance(v, (int, float)) and not ok(v, bound):
                where = path if i is None else f"{path}[{i}]"
                raise ConfigError(where, f"must be {text.format(bound)}, got {v}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys, wrong types and out-of-range values."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(path, f"unknown key; allowed keys here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, {} if value is None else value, path + ".")
        else:
            kwargs[key] = check_value(path, value, tp)
            check_bounds(path, kwargs[key], fields[key].metadata.get("bounds", {}))
    return cls(**kwargs)


def deep_merge(base: dict, override: dict, shallow: tuple[str, ...] = ()) -> dict:
    """``override`` merged into a copy of ``base``; the mappings under the keys ``shallow`` merge one level only."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)} if k in shallow else deep_merge(out[k], v, shallow)
        else:
            out[k] = copy.deepcopy(v)
    return out
