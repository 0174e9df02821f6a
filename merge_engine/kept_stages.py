"""Kept intermediate stages (``--intermediate-dir DIR``): which folders a run may reuse.

mergekit-multi (0.1.5, ``--lazy``, its default) skips a stage whose folder holds a
``config.json`` and a weights file, whatever recipe made it: a stage edited since the last run
is silently not re-merged, and neither is anything downstream of it. We reuse a folder only
when it holds a complete merge of the *same* stage: each kept stage's ``evomerge_recipe.yaml``
starts with a line naming the stage and a digest (sha256) of what its output depends on: the
stage's recipe, those of the stages it reads (recursively, by name) and ``lora_merge_dtype``.
A folder with another digest, none, or missing weights is refused in one line before any stage
runs (``force`` replaces it), so nothing a user made is overwritten.

The digest covers recipes, not the bytes of input models: a model folder changed in place under
the same path is not noticed (remove the kept folders, as with mergekit-multi).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from merge_engine.errors import OutputExistsError
from merge_engine.stages import Stage

RECIPE_FILE = "evomerge_recipe.yaml"
_HEADER = "# evomerge stage {name}: inputs sha256 {digest}"


def stage_key(stage: Stage, stages: Sequence[Stage]) -> str:
    """What a stage's output depends on, as text: its recipe and, recursively, those it reads."""
    by_name = {s.name: s for s in stages}
    return stage.recipe.to_yaml() + "".join(f"\n#<{n}>\n" + stage_key(by_name[n], stages) for n in stage.needs)


def stage_digest(stage: Stage, stages: Sequence[Stage], lora_merge_dtype: str | None = None) -> str:
    """sha256 of :func:`stage_key` and the ``lora_merge_dtype`` the stage is merged with."""
    text = stage_key(stage, stages) + f"\n#<lora_merge_dtype>\n{lora_merge_dtype}\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def kept_recipe_text(name: str, digest: str, recipe_yaml: str) -> str:
    """The ``evomerge_recipe.yaml`` of a kept stage: the digest line, then the recipe."""
    return _HEADER.format(name=name, digest=digest) + "\n" + recipe_yaml


def kept_state(folder: Path, name: str, digest: str) -> str | None:
    """None when ``folder`` holds a complete merge of stage ``name`` with ``digest`` (reusable);
    else what it holds instead, for a message (``folder`` exists)."""
    recipe = folder / RECIPE_FILE
    try:
        first = recipe.read_text(encoding="utf-8").split("\n", 1)[0] if recipe.is_file() else ""
    except (OSError, UnicodeDecodeError):
        first = ""
    prefix = _HEADER.format(name=name, digest="")
    if not first.startswith(prefix):
        return "no kept evomerge stage"
    if first != _HEADER.format(name=name, digest=digest):
        return f"a merge of another recipe for stage {name} (or of other stages it reads)"
    if not (folder / "config.json").is_file() or not _weights_complete(folder):
        return f"an incomplete merge of stage {name}"
    return None


def check_kept(keep_dir: Path, stages: Sequence[Stage], lora_merge_dtype: str | None, force: bool) -> set[str]:
    """The named stages of ``stages`` whose folder in ``keep_dir`` can be reused; raises
    OutputExistsError (one line) for the first folder holding anything else, unless ``force``."""
    reuse = set()
    for stage in stages:
        if stage.name is None or not (keep_dir / stage.name).exists():
            continue
        held = kept_state(keep_dir / stage.name, stage.name, stage_digest(stage, stages, lora_merge_dtype))
        if held is None:
            reuse.add(stage.name)
        elif not force:
            raise OutputExistsError(f"intermediate folder {keep_dir / stage.name} holds {held}; remove it, "
                                    "give another --intermediate-dir, or pass --force to replace it")
    return reuse


def _weights_complete(folder: Path) -> bool:
    """Whether ``folder`` holds its safetensors weights: one file, or every shard its index names."""
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((folder / s).is_file() for s in shards)
