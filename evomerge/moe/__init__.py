"""MoE searches: the search space over MoE builds (:mod:`evomerge.moe.space`); the builds
themselves are :mod:`merge_engine.moe`."""
