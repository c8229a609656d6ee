"""Module-level ``__getattr__`` that imports a package's heavy submodules only when one of their names is used."""

import importlib
import sys
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A ``__getattr__`` for `package` resolving each name of `exports` (name -> module) on first access.

    The resolved object is cached in the package's namespace, so later accesses skip this function.
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
