"""evomerge: evolutionary model-merge search (Optuna + merge_engine + lm-eval)."""

__version__ = "0.1.0"
