"""The evaluator interface: the fitness function of the search. Backends live in their own
modules and are listed in :mod:`evomerge.evaluate.backends`."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.evaluate.result import EvalResult


class Evaluator(abc.ABC):
    """Scores candidate models on the tasks of one :class:`~evomerge.evaluate.EvalConfig`.

    Lifecycle:

    1. Constructed once per run (through :func:`~evomerge.evaluate.make_evaluator`): validates the
       config (raising ``EvalConfigError`` before any model is touched) and builds the lm-eval
       tasks; they are reused for every candidate.
    2. ``evaluate(model, tokenizer)`` once per candidate, many times. ``model`` is the resident
       model whose weights the caller changes in place between calls (or a model directory).
       Every call sees the same docs, few-shot examples and seeds, so equal weights score equally.
    3. ``close()`` once at the end (also via ``with``): frees backend resources (e.g. a vLLM engine).
    """

    @abc.abstractmethod
    def evaluate(self, model: Any, tokenizer: Any = None, docs: Any = None) -> EvalResult:
        """Score one candidate. ``tokenizer`` may be omitted when ``model`` is a directory.
        ``docs`` (leaf task -> doc ids): score only those docs and return their per-doc items
        too (``TaskRunner.run``)."""

    def close(self) -> None:
        """Release backend resources. Safe to call twice."""

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
