"""Public names that load on first use (PEP 562), for the packages whose imports must stay light: ``litepatch``
(its front door) and ``litepatch.kernels`` (whose vocabulary the recipes read without the backends and torch).

Example (a package's ``__init__``)::

    __getattr__, __dir__ = lazy_names(globals(), {"lite_attention": "litepatch.kernels.interface"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(namespace: dict, owners: Mapping[str, str]) -> tuple[Callable, Callable]:
    """The module-level ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``: a name of
    ``owners`` (public name -> the module that owns it) or a submodule, imported on first use and kept."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        """A public name from the module that owns it, or a submodule, on first use."""
        if name in owners:
            value = getattr(importlib.import_module(owners[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(owners))

    return __getattr__, __dir__
