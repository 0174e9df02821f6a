"""The evaluator interface: the fitness function of the search."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.config import EvalConfig
from evomerge.evaluate.result import EvalResult

if TYPE_CHECKING:
    from evomerge.evaluate.catalog import TaskCatalog


class Evaluator(abc.ABC):
    """Scores candidate models on the tasks of one :class:`EvalConfig`.

    Lifecycle:

    1. ``Evaluator(cfg)`` once per run: validates ``cfg`` (raising ``EvalConfigError`` before any
       model is touched) and builds the lm-eval tasks; they are reused for every candidate.
    2. ``evaluate(model, tokenizer)`` once per candidate, many times. ``model`` is the resident
       model whose weights the caller changes in place between calls (or a model directory).
       Every call sees the same docs, few-shot examples and seeds, so equal weights score equally.
    3. ``close()`` once at the end (also via ``with``): frees backend resources (e.g. a vLLM engine).
    """

    def __init__(self, cfg: EvalConfig, catalog: TaskCatalog | None = None) -> None:
        from evomerge.evaluate.runner import TaskRunner

        self.cfg = cfg
        self.runner = TaskRunner(cfg, catalog)

    @abc.abstractmethod
    def evaluate(self, model: Any, tokenizer: Any = None) -> EvalResult:
        """Score one candidate. ``tokenizer`` may be omitted when ``model`` is a directory."""

    def close(self) -> None:
        """Release backend resources. Safe to call twice."""

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_evaluator(
    cfg: EvalConfig, *, device: str = "cpu", catalog: TaskCatalog | None = None
) -> Evaluator:
    """The evaluator for ``cfg.backend`` (``"hf"`` or ``"vllm"``)."""
    if cfg.backend == "vllm":
        from evomerge.evaluate.vllm_backend import VLLMEvaluator

        return VLLMEvaluator(cfg, device=device, catalog=catalog)
    from evomerge.evaluate.hf import HFEvaluator

    return HFEvaluator(cfg, device=device, catalog=catalog)
