"""Shared pytest setup: tests import helpers from tests/fixtures.py (checkpoints) and tests/spaces.py
(search spaces), run offline, and share the math/code `zoo` fixture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The math/code zoo (fixtures.make_math_code_zoo: base, math, code), built once per test
    module; a module that needs other models defines its own ``zoo``."""
    from fixtures import make_math_code_zoo

    return make_math_code_zoo(tmp_path_factory.mktemp("math_code"))
