"""What a search trial proposes, and what the search loop needs of it and of the resident model.

A proposal is one candidate of a search, of one of three types:

* :class:`~merge_engine.recipe.MergeRecipe`: a parameter-space candidate (one merge);
* :class:`MultiStageRecipe`: a multi-stage candidate (fixed stages around the searched one, or
  one stage per method the layer groups pick), its stages in run order, the final one last;
* :class:`~evomerge.moe.search_space.MoERecipe`: an MoE build (and the merge of its shared weights).

The loop needs only :class:`Proposal` of each (its seed, and the YAML it stores in the trial
and the results re-merge or rebuild from) and hands it to a :class:`Resident` model, which
writes it into itself: :class:`~evomerge.candidate.Candidate` takes the first two,
:class:`~evomerge.moe.candidate.MoECandidate` the third.
"""

from __future__ import annotations

from typing import Any, Protocol

from merge_engine.stages import Stage, stages_yaml


class Proposal(Protocol):
    """One candidate as the loop stores it: ``seed`` (of the merge's random parts) and
    ``to_yaml()``, the text in the trial's ``recipe`` user attr."""

    @property
    def seed(self) -> int: ...

    def to_yaml(self) -> str: ...


class Resident(Protocol):
    """The resident model of a search: ``apply`` writes a proposal into ``model`` in place;
    the evaluators then score ``model`` with ``tokenizer``."""

    model: Any
    tokenizer: Any

    def apply(self, proposal: Any) -> Any: ...


class MultiStageRecipe(tuple[Stage, ...]):
    """A multi-stage candidate: its stages in run order, the final one last. A tuple of
    :class:`~merge_engine.stages.Stage`, so every function that takes stages takes it;
    ``to_yaml()`` is the multi-document recipe file ``evomerge merge`` re-merges it from."""

    __slots__ = ()

    @property
    def seed(self) -> int:
        return self[-1].recipe.seed

    def to_yaml(self) -> str:
        return stages_yaml(self)
