"""HF backend: lm-eval's ``HFLM`` wrapped around the resident ``nn.Module`` (no save/reload)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.adapters.lm_eval import resident_hflm_class
from evomerge.candidate import load_causal_lm
from evomerge.devices import hf_load_kwargs, resolve_device
from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.scratch import ScratchModelDir
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

    Placement (the hf memory plans of :mod:`evomerge.devices`): a model object is scored where it
    lives; a directory is loaded on ``device`` (or by ``device_map: auto``). With ``load_in``
    every candidate is scored on a quantized copy: the full-precision model is saved to a
    scratch folder and reloaded through bitsandbytes onto ``device``, then dropped.
    """

    def __init__(
        self, cfg: EvalConfig, *, device: str = "cpu", catalog: TaskCatalog | None = None
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(device)  # cpu or cuda:N, never auto
        self.load_kwargs = hf_load_kwargs(cfg, self.device)  # refuses what this device cannot run
        self.runner = TaskRunner(cfg, catalog)
        self._scratch = ScratchModelDir("evomerge-quant-")
        self._lm: Any = None
        self._lm_key: tuple[int, int] | None = None

    def evaluate(self, model: Any, tokenizer: Any = None, docs: Any = None) -> EvalResult:
        if self.cfg.load_in is not None and not isinstance(model, (str, Path)):
            if tokenizer is None:
                raise ValueError("HFEvaluator.evaluate needs the tokenizer when given a model object")
            model = self._quantized_copy_dir(model, tokenizer)
        if isinstance(model, (str, Path)):
            model, tokenizer = load_causal_lm(model, dtype=self.cfg.dtype, device=self.device,
                                              **self.load_kwargs)
        if tokenizer is None:
            raise ValueError("HFEvaluator.evaluate needs the tokenizer when given a model object")
        try:
            return self.runner.run(self._wrap(model, tokenizer), docs)
        finally:
            if self.cfg.load_in is not None:
                self.close()  # the quantized copy is scored once

    def close(self) -> None:
        self._lm = self._lm_key = None

    def _quantized_copy_dir(self, model: Any, tokenizer: Any) -> Path:
        """Save the full-precision ``model`` to the scratch folder the quantized copy loads from
        (it lives as long as the evaluator: ``close()`` keeps the evaluator usable)."""
        return self._scratch.save(model, tokenizer)

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            self._lm = resident_hflm_class()(
                pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size)
            self._lm_key = key
        return self._lm
