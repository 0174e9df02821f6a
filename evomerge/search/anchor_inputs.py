"""The input models' per-doc results, for the anchor estimator of a ``fidelity.anchors`` rung.

The estimator chooses its anchor docs on how docs separate models already scored on the full
search set (:mod:`evomerge.evaluate.estimator`). The merge inputs are such models before any
candidate has finished: with them in the bank, the anchor rung starts after
``anchor_trials - inputs`` complete candidates instead of ``anchor_trials``.

Lifecycle, in the run that creates the study (:func:`~evomerge.search.run.run_study`):
:func:`score_anchor_inputs` after the resident model is loaded and before the study is opened
(nothing is written yet), then :func:`store_anchor_inputs` right after the study is created and
before its start points are enqueued. A worker joining later reads them from the study
(:class:`~evomerge.search.fidelity.AnchorRung`); a resumed study keeps what its creator stored.
The cost is one full search evaluation per input model, paid once per study (recorded with the
items: :func:`anchor_input_samples`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evomerge.search.fidelity import ANCHOR_INPUTS, storable
from evomerge.search.held_out import one_model_recipe
from evomerge.space.stages import input_stages

if TYPE_CHECKING:
    import optuna

    from evomerge.search.loop import Evaluators
    from evomerge.space import SearchSpace

StoredInputs = list[list[Any]]  # [[model name, {leaf: {doc id (str): item}}], ...]


def score_anchor_inputs(space: SearchSpace, candidate: Any, evaluators: Evaluators, known: int,
                        say: Callable[[str], None] = lambda text: None) -> StoredInputs | None:
    """Every input model's per-doc items on the full search docs, in the space's model order;
    None when the run has no anchor rung or its study already has trials (``known``: trials
    stored before this run). An input that cannot be merged or scored alone is left out (the
    estimator is fitted on the others), with one line to ``say``."""
    ladder = evaluators.ladder
    if known or ladder is None or ladder.anchor is None:
        return None
    full = ladder.doc_sets[-1]
    out: StoredInputs = []
    for m in space.all_models():
        say(f"anchor estimator: scoring input model {m.name} on the full search docs")
        try:
            candidate.apply(input_stages(space, m.model) or one_model_recipe(m.model, space.dtype))
            result = ladder.evaluator.evaluate(candidate.model, candidate.tokenizer, docs=full)
        except Exception as err:  # noqa: BLE001  one unscorable input must not stop the search
            say(f"anchor estimator: input model {m.name} left out ({type(err).__name__}: {err})"[:300])
            continue
        out.append([m.name, storable(result.extra["docs"])])
    return out


def store_anchor_inputs(study: optuna.Study, inputs: StoredInputs | None) -> None:
    """Keep ``inputs`` in the study (once: a study that has them keeps its own)."""
    if inputs is not None and ANCHOR_INPUTS not in study.user_attrs:
        study.set_user_attr(ANCHOR_INPUTS, inputs)


def anchor_input_samples(study: optuna.Study) -> int:
    """Docs scored for the input models of the anchor estimator (0 when none were)."""
    return sum(len(docs) for _, items in study.user_attrs.get(ANCHOR_INPUTS) or () for docs in items.values())
