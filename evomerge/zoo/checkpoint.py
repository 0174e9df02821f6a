"""Saving a zoo or converted model folder the way a user's own files look."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evomerge.zoo.tokenizer import save_tokenizer
from merge_engine.io import current_umask


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write ``model`` (safetensors) and ``tokenizer`` into ``folder`` and give every file in it
    the permissions a new file gets under the process umask (0644 under the usual 022).

    transformers writes ``model.safetensors`` through a private temporary file (mode 0600), so
    without this a zoo or converted SmolLM2 folder would be unreadable to other users, unlike
    every folder ``evomerge merge`` writes."""
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    mode = 0o666 & ~current_umask()
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, mode)
