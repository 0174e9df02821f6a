"""One-call evaluation of a saved model directory (what ``evomerge eval`` runs)."""

from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

from evomerge.evaluate.backends import make_evaluator

if TYPE_CHECKING:
    from evomerge.evaluate.result import EvalResult
    from evomerge.evaluate.tasks.config import EvalConfig


def evaluate_model_dir(
    model: str | Path, cfg: EvalConfig, device: str = "cpu", out_json: Path | None = None
) -> EvalResult:
    """Validate ``cfg``, build the tasks, then load ``model`` (a local directory) and score it.

    Config problems raise ``EvalConfigError`` before the model is read. With ``out_json`` the
    result (``EvalResult.to_dict()`` plus the model path and the config) is written there.
    """
    model = Path(model)
    with make_evaluator(cfg, device=device) as evaluator:  # validates cfg, builds the tasks
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
        result = evaluator.evaluate(model)
    if out_json is not None:
        payload = {"model": str(model), "config": cfg.model_dump(mode="json"), **result.to_dict()}
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(payload, indent=2) + "\n")
    return result
