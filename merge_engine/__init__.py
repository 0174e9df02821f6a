"""merge_engine: a mergekit-compatible model merge library with a DAG executor."""

__version__ = "0.1.0"
