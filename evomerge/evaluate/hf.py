"""HF backend: lm-eval's ``HFLM`` wrapped around the resident ``nn.Module`` (no save/reload)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.config import EvalConfig
from evomerge.evaluate.result import EvalResult

if TYPE_CHECKING:
    from evomerge.evaluate.catalog import TaskCatalog


class HFEvaluator(Evaluator):
    """Evaluates the in-memory model with lm-eval's ``HFLM``.

    The ``HFLM`` wrapper is kept while the same model and tokenizer objects come back, so a
    candidate costs only the forward passes plus lm-eval's request building; weights changed in
    place are seen by the next ``evaluate``. ``model`` may also be a model directory (loaded here).
    """

    def __init__(
        self, cfg: EvalConfig, *, device: str = "cpu", catalog: TaskCatalog | None = None
    ) -> None:
        super().__init__(cfg, catalog)
        self.device = device
        self._lm: Any = None
        self._lm_key: tuple[int, int] | None = None

    def evaluate(self, model: Any, tokenizer: Any = None) -> EvalResult:
        if isinstance(model, (str, Path)):
            model, tokenizer = load_model_dir(model, dtype=self.cfg.dtype, device=self.device)
        if tokenizer is None:
            raise ValueError("HFEvaluator.evaluate needs the tokenizer when given a model object")
        return self.runner.run(self._wrap(model, tokenizer))

    def close(self) -> None:
        self._lm = self._lm_key = None

    def _wrap(self, model: Any, tokenizer: Any) -> Any:
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size)
            self._lm_key = key
        return self._lm


def load_model_dir(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a saved model")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
