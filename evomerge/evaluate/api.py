"""One-call evaluation of a saved model (what ``evomerge eval`` runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.evaluate.backends import make_evaluator

if TYPE_CHECKING:
    from evomerge.evaluate.result import EvalResult
    from evomerge.evaluate.tasks.config import EvalConfig


def resolve_model(model: str | Path, *, allow_pickle: bool = False) -> Path:
    """The local directory of ``model``: a model directory, or a hub id (``org/name[@revision]``)
    resolved like a recipe's models (the hub cache, else a download; offline or unreachable hub:
    the cache alone), with its checkpoint checked the way a merge checks its inputs (headers,
    sizes, shard index; pickle-only weights refused unless ``allow_pickle``) before transformers
    loads it. Raises a one-line ``MergeError`` naming the model and the fix."""
    from merge_engine.errors import CheckpointError
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.io.refs import ModelRef
    from merge_engine.io.resolve import loadable_model_dir

    try:
        ref = ModelRef.parse(str(model))
    except ValueError as err:
        raise CheckpointError(f"model {model}: {err}") from None
    folder = loadable_model_dir(ref, allow_pickle=allow_pickle)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{model} is not a model directory (no config.json); "
                              "give a transformers model directory or a hub id")
    with CheckpointReader(folder, allow_pickle=allow_pickle):  # reads and checks headers only
        pass
    return folder


def evaluate_model_dir(
    model: str | Path, cfg: EvalConfig, device: str = "cpu", out_json: Path | None = None,
    allow_pickle: bool = False,
) -> EvalResult:
    """Validate ``cfg``, resolve ``model`` (see :func:`resolve_model`), build the tasks, then
    load the model and score it.

    Config problems raise ``EvalConfigError`` before the model is looked up; a model that cannot
    be found raises a one-line ``MergeError`` before any dataset is read. With ``out_json`` the
    result (``EvalResult.to_dict()`` plus the model as given and the config) is written there.
    """
    from evomerge.evaluate.tasks.validate import check_eval_config

    catalog = check_eval_config(cfg)
    folder = resolve_model(model, allow_pickle=allow_pickle)
    with make_evaluator(cfg, device=device, catalog=catalog) as evaluator:  # builds the tasks
        result = evaluator.evaluate(folder)
    if out_json is not None:
        payload = {"model": str(model), "config": cfg.model_dump(mode="json"), **result.to_dict()}
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(payload, indent=2) + "\n")
    return result
