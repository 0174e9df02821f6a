"""MoE searches: the genes of an MoE build (:mod:`evomerge.moe.space`), the search space file
with a ``moe:`` block and trial -> candidate (:mod:`evomerge.moe.search_space`), the resident MoE
(:mod:`evomerge.moe.candidate`) and the run (:mod:`evomerge.moe.run`). The builds themselves are
:mod:`merge_engine.moe`."""
