"""The model zoo: tiny Llama models trained on CPU (a base and per-skill experts) whose merges
beat each of them, plus a converter for the real SmolLM2-135M-Instruct.

Public API::

    build_zoo(out_dir, variant="demo", seed=0, force=False, log=print) -> ZooManifest
    default_zoo_dir(variant) -> Path
    convert_smollm2(out_dir, dtype="bfloat16") -> Path

The matching lm-eval tasks live in ``eval_tasks/zoo`` (see its README).
"""

from __future__ import annotations

from evomerge.zoo.build import RECIPES, ZOO_VERSION, build_zoo, default_zoo_dir, expert_name
from evomerge.zoo.manifest import ZooManifest
from evomerge.zoo.smollm2 import convert_smollm2

__all__ = ["RECIPES", "ZOO_VERSION", "ZooManifest", "build_zoo", "convert_smollm2",
           "default_zoo_dir", "expert_name"]
