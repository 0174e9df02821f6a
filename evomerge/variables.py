"""``${NAME}`` placeholders in YAML files (search spaces, ablation grids)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: Any, variables: Mapping[str, str], missing: Callable[[str], Exception]) -> Any:
    """Replace ``${NAME}`` in every string, from ``variables`` then the environment;
    an unset name raises ``missing(name)``."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in variables:
                return str(variables[key])
            if key in os.environ:
                return os.environ[key]
            raise missing(key)
        return VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_vars(v, variables, missing) for v in value]
    if isinstance(value, dict):
        return {k: expand_vars(v, variables, missing) for k, v in value.items()}
    return value
