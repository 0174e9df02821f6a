"""Search spaces for tests, as parsed YAML (a dict for ``parse_space`` or a space file), over the
math/code zoo of :func:`fixtures.make_math_code_zoo` (tests/conftest.py's ``zoo`` fixture):

    math_code_space(zoo)                         task arithmetic of math and code on base, smoke_mc (4 docs)
    math_code_space(zoo, limit=6, top_k=2)       another doc limit; any other key set or replaced
    ties_per_layer_space(zoo, budget=...)        TIES per layer and filter: 25 numbers (5 when tied)

Import them as ``from spaces import math_code_space``. A key given replaces the default whole
(``eval=`` replaces ``tasks``/``limit`` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def math_code_space(zoo: Path, *, tasks: Sequence[str] = ("smoke_mc",), limit: int | None = 4,
                    **fields: Any) -> dict[str, Any]:
    """Task arithmetic of the zoo's ``math`` and ``code`` on its ``base``, scored on ``limit``
    docs of ``tasks`` in batches of 32; ``fields`` set or replace top-level keys."""
    return {"name": "t",
            "models": [{"name": "math", "model": str(zoo / "math")}, {"name": "code", "model": str(zoo / "code")}],
            "base_model": str(zoo / "base"), "method": "task_arithmetic",
            "eval": {"tasks": list(tasks), "limit": limit, "batch_size": 32}, **fields}


def ties_per_layer_space(zoo: Path, **fields: Any) -> dict[str, Any]:
    """TIES weights and densities per layer and per filter, and lambda, over the math/code zoo:
    25 numeric parameters (5 when tied across layers), seed 7."""
    return math_code_space(zoo, **{"name": "big", "method": "ties", "layer_granularity": 1,
                                   "filters": ["self_attn", "mlp"], "seed": 7, **fields})
