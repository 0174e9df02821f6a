"""The search: an Optuna study over a search space, run by one process or many workers.

``study`` opens or resumes a study (the space is stored in it) on a storage that survives dead
workers; ``samplers`` is the one sampler registry; ``loop`` runs ask → recipe → apply →
evaluate → tell; ``workers`` joins a study and is the one path for trials of dead workers;
``held_out`` scores the best trials on the report split; ``preflight`` checks everything
before a run writes anything; ``run`` is one whole run.
Import from the modules (``from evomerge.search.run import run_search``): the space package
reads the sampler registry, so this package imports nothing at import time.
"""
