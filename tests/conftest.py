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


@pytest.fixture
def hf_home_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's dataset cache (HF_HOME) in the test's own temporary folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture
def optuna_warnings_only():
    """Optuna logs warnings and errors only during the test (not a line per trial)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)
