"""Evaluation: the fitness signal of the search (lm-eval tasks on the resident model).

Import cost is small: lm-eval, transformers and vllm are imported only when used.
"""

from __future__ import annotations

from evomerge.evaluate.api import evaluate_model_dir
from evomerge.evaluate.base import Evaluator, make_evaluator
from evomerge.evaluate.catalog import TaskCatalog
from evomerge.evaluate.config import (
    EvalConfig,
    EvalConfigError,
    TaskSpec,
    available_presets,
    load_preset,
)
from evomerge.evaluate.result import EvalResult, TaskScore, format_table, weighted_score
from evomerge.evaluate.validate import check_eval_config, validate_eval_config

__all__ = [
    "EvalConfig",
    "EvalConfigError",
    "EvalResult",
    "Evaluator",
    "TaskCatalog",
    "TaskScore",
    "TaskSpec",
    "available_presets",
    "check_eval_config",
    "evaluate_model_dir",
    "format_table",
    "load_preset",
    "make_evaluator",
    "validate_eval_config",
    "weighted_score",
]


def __getattr__(name: str):  # HFEvaluator / VLLMEvaluator without importing their backends eagerly
    if name == "HFEvaluator":
        from evomerge.evaluate.hf import HFEvaluator

        return HFEvaluator
    if name == "VLLMEvaluator":
        from evomerge.evaluate.vllm_backend import VLLMEvaluator

        return VLLMEvaluator
    raise AttributeError(name)
