"""The evaluator backends: one registry line each, and :func:`make_evaluator`.

Adding a backend = its module (an :class:`~evomerge.evaluate.base.Evaluator` subclass taking
``(cfg, *, device, catalog)``) + one :class:`Backend` line in :data:`BACKENDS`. ``EvalConfig.backend``
accepts exactly the names listed here. Backend modules are imported only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.evaluate.base import Evaluator
    from evomerge.evaluate.tasks.catalog import TaskCatalog
    from evomerge.evaluate.tasks.config import EvalConfig


@dataclass(frozen=True)
class Backend:
    """One evaluator backend.

    - ``target``: ``"module:Class"`` of its :class:`~evomerge.evaluate.base.Evaluator`.
    - ``scores_resident_model``: ``evaluate(model, tokenizer)`` runs the given ``nn.Module``
      itself, so weights a caller changes in place are scored with no copy (``load_in`` aside, which
      scores a quantized copy): merging into one
      resident model and passing it is the cheap path. ``False``: the backend copies the weights
      into its own engine on each call, and scoring a merged model directory costs about the same.
    - ``keeps_last_model``: the evaluator holds a reference to the last model object it scored
      until the next ``evaluate`` or ``close()``. A caller dropping a model (a loaded parent)
      calls ``close()`` first so its memory can be freed; ``close()`` is then cheap and the
      evaluator stays usable (its tasks are kept).
    """

    name: str
    target: str
    scores_resident_model: bool
    keeps_last_model: bool


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("hf", "evomerge.evaluate.hf:HFEvaluator",
            scores_resident_model=True, keeps_last_model=True),
    Backend("vllm", "evomerge.evaluate.vllm:VLLMEvaluator",
            scores_resident_model=False, keeps_last_model=False),
)}


def backend(name: str) -> Backend:
    """The registry entry of ``name``; an unknown name raises ``ValueError`` naming the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown eval backend {name!r}; known backends: {', '.join(BACKENDS)}") from None


def make_evaluator(cfg: EvalConfig, *, device: str = "cpu",
                   catalog: TaskCatalog | None = None) -> Evaluator:
    """The evaluator of ``cfg.backend``, built on ``device`` (``catalog``: the run's task catalog,
    to avoid indexing the tasks twice)."""
    module, _, cls = backend(cfg.backend).target.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, device=device, catalog=catalog)
