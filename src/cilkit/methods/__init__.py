"""Class-incremental methods, one module (or package) each, and their registry.

``METHODS`` maps a config name to its class. Every module of this package is scanned for
:class:`Method` subclasses with a ``name``, so adding a method is adding its file. Only the
composition root (:mod:`cilkit.experiment`) and the CLI look methods up here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from cilkit.methods.base import Method


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


METHODS: dict[str, type[Method]] = _discover()

__all__ = ["METHODS", "Method"]
