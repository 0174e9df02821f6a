"""The tasks side of evaluation, independent of the backend: the config (``config``), lm-eval's
task index (``catalog``), checks before any model is loaded (``validate``) and the built-once
tasks run per candidate (``runner``). Public names are re-exported from :mod:`evomerge.evaluate`.
"""
