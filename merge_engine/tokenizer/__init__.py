"""The output tokenizer of a merge and the embedding/head rows that follow it.

:mod:`.vocab` builds the output vocabulary (``base``, ``union`` or a model's tokenizer, plus
``tokenizer.tokens``) and maps each input's rows onto it; :mod:`.rows` plans, per vocabulary
tensor, which row every output token gets from each input (own row, a donor's, an average, zeros).
"""

from __future__ import annotations

from merge_engine.tokenizer.rows import RowPlan, plan_rows
from merge_engine.tokenizer.vocab import Vocabulary, build_vocabulary, config_vocab_size, recipe_vocabulary

__all__ = ["RowPlan", "Vocabulary", "build_vocabulary", "config_vocab_size", "plan_rows", "recipe_vocabulary"]
