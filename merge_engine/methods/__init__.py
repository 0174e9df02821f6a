"""Merge methods: one small file per method, all listed in :mod:`merge_engine.methods.registry`.

Importing this package has no side effects; ``METHODS``, ``get_method`` and
``method_names`` are re-exported lazily from the registry (importing it eagerly
here would make ``merge_engine.sparsify`` and the method files import each
other in a cycle).
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "get_method", "method_names"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from merge_engine.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
