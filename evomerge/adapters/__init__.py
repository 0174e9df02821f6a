"""The only code that touches private internals of lm-eval and optuna.

Each module here is pinned to the versions it is tested on (see pyproject.toml) and fails with
one clear line, naming the installed and the supported versions, when those internals moved.
"""
