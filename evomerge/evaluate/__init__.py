"""Evaluation: the fitness signal of the search (lm-eval tasks on the resident model).

Import cost is small: lm-eval, transformers and vllm are imported only when used, and the names
that reach lm-eval (the catalog, validation, the backends) are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from evomerge.evaluate.api import evaluate_model_dir
from evomerge.evaluate.backends import BACKENDS, Backend, backend, make_evaluator
from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.result import EvalResult, TaskScore, format_table, weighted_score
from evomerge.evaluate.tasks.config import (
    EvalConfig,
    EvalConfigError,
    TaskSpec,
    available_presets,
    load_preset,
)

# name -> module, imported on first access (they import the lm-eval adapter)
_LAZY = {
    "TaskCatalog": "evomerge.evaluate.tasks.catalog",
    "check_eval_config": "evomerge.evaluate.tasks.validate",
    "validate_eval_config": "evomerge.evaluate.tasks.validate",
    "HFEvaluator": "evomerge.evaluate.hf",
    "VLLMEvaluator": "evomerge.evaluate.vllm",
}

__all__ = [
    "BACKENDS",
    "Backend",
    "EvalConfig",
    "EvalConfigError",
    "EvalResult",
    "Evaluator",
    "TaskCatalog",
    "TaskScore",
    "TaskSpec",
    "available_presets",
    "backend",
    "check_eval_config",
    "evaluate_model_dir",
    "format_table",
    "load_preset",
    "make_evaluator",
    "validate_eval_config",
    "weighted_score",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evomerge.evaluate' has no attribute {name!r}")
