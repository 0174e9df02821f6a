"""HF backend: lm-eval's ``HFLM`` wrapped around the resident ``nn.Module`` (no save/reload)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.adapters.lm_eval import resident_hflm_class
from evomerge.candidate import load_causal_lm
from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.tasks.runner import TaskRunner

if TYPE_CHECKING:
    from evomerge.evaluate.result import EvalResult
    from evomerge.evaluate.tasks.catalog import TaskCatalog
    from evomerge.evaluate.tasks.config import EvalConfig


class HFEvaluator(Evaluator):
    """Evaluates the in-memory model with lm-eval's ``HFLM`` (see :class:`Evaluator` for the
    lifecycle).

    The ``HFLM`` wrapper is kept while the same model and tokenizer objects come back, so a
    candidate costs only the forward passes plus lm-eval's request building; weights changed in
    place are seen by the next ``evaluate``. ``model`` may also be a model directory (loaded here).
    ``close()`` drops the wrapper (and with it the last model); the evaluator stays usable.
    """

    def __init__(
        self, cfg: EvalConfig, *, device: str = "cpu", catalog: TaskCatalog | None = None
    ) -> None:
        self.cfg = cfg
        self.runner = TaskRunner(cfg, catalog)
        self.device = device
        self._lm: Any = None
        self._lm_key: tuple[int, int] | None = None

    def evaluate(self, model: Any, tokenizer: Any = None) -> EvalResult:
        if isinstance(model, (str, Path)):
            model, tokenizer = load_causal_lm(model, dtype=self.cfg.dtype, device=self.device)
        if tokenizer is None:
            raise ValueError("HFEvaluator.evaluate needs the tokenizer when given a model object")
        return self.runner.run(self._wrap(model, tokenizer))

    def close(self) -> None:
        self._lm = self._lm_key = None

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            self._lm = resident_hflm_class()(
                pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size)
            self._lm_key = key
        return self._lm
